"""Against the real vLLM package (skipped where vLLM is not installed).

vllm==0.33.0 pins torch==2.14.0 together with torchaudio==2.11.0 and flashinfer;
on the CPU-only CI machine that resolution does not install, so this module
runs only where vLLM already is (e.g. a GPU serving box):
`pip install vllm==0.33.0 && python -m pytest tests/test_vllm_real.py -m vllm`.
"""

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")


def test_factory_loads_p2pkv_connector():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    ktc = KVTransferConfig(kv_connector="P2pkvConnector", kv_connector_module_path="p2pkv.adapters.vllm",
                           kv_role="kv_producer", kv_connector_extra_config={"mode": "push", "timeout_s": 5})
    cls = KVConnectorFactory.get_connector_class(ktc)
    from p2pkv.adapters.vllm import HAVE_VLLM, P2pkvConnector

    assert cls is P2pkvConnector and HAVE_VLLM and issubclass(cls, KVConnectorBase_V1)
