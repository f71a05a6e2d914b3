"""vLLM KV connector (``kv_connector_module_path: "p2pkv.adapters.vllm"``, ``kv_connector: "P2pkvConnector"``).

Importing this package needs no vLLM and touches no GPU, socket or thread; where vLLM is
installed it registers ``P2pkvConnector`` in vLLM's ``KVConnectorFactory`` (see ``_register``).
"""

from ._base import HAVE_VLLM, KVConnectorRole
from ._register import register_with_vllm
from ._stats import P2pkvKVConnectorStats
from .connector import LoadSpec, P2pkvConnector, P2pkvConnectorMetadata, Release, SaveSpec, block_view

__all__ = ["P2pkvConnector", "P2pkvConnectorMetadata", "SaveSpec", "LoadSpec", "Release", "HAVE_VLLM",
           "KVConnectorRole", "P2pkvKVConnectorStats", "block_view", "register_with_vllm"]

if HAVE_VLLM:  # pragma: no cover - exercised only where vLLM is installed
    register_with_vllm()
