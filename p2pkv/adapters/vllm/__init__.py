"""vLLM KV connector (``kv_connector_module_path: "p2pkv.adapters.vllm"``, ``kv_connector: "P2pkvConnector"``).

Importing this package needs no vLLM and touches no GPU, socket or thread.
"""

from ._base import HAVE_VLLM, KVConnectorRole
from ._stats import P2pkvKVConnectorStats
from .connector import LoadSpec, P2pkvConnector, P2pkvConnectorMetadata, SaveSpec, block_view

__all__ = ["P2pkvConnector", "P2pkvConnectorMetadata", "SaveSpec", "LoadSpec", "HAVE_VLLM", "KVConnectorRole",
           "P2pkvKVConnectorStats", "block_view"]
