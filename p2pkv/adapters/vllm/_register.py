"""Registration of ``P2pkvConnector`` in vLLM's connector registry (``KVConnectorFactory``).

``kv_connector_module_path`` alone is enough to load the connector, but vLLM also
looks connectors up by class name: ``MultiConnector`` rebuilds each child's
stats from the registry (``get_connector_class_by_name``) in its stats logger.
Importing :mod:`p2pkv.adapters.vllm` therefore registers the connector there
(lazily: vLLM imports this module only when it builds the connector).
"""

from __future__ import annotations

import logging

__all__ = ["NAME", "register_with_vllm"]

NAME = "P2pkvConnector"
log = logging.getLogger("p2pkv.vllm")


def register_with_vllm() -> bool:
    """Register ``P2pkvConnector`` in vLLM's ``KVConnectorFactory`` (True when it is registered).

    Safe to call any number of times, from any import path: a name already registered (by an
    earlier call, or by vLLM itself) is left as it is, and without vLLM nothing happens (False).
    Touches no GPU, socket or thread.
    """
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except Exception:  # vLLM absent or unusable here: nothing to register with
        return False
    registry = getattr(KVConnectorFactory, "_registry", None)
    if isinstance(registry, dict) and NAME in registry:
        return True
    try:
        KVConnectorFactory.register_connector(NAME, "p2pkv.adapters.vllm", NAME)
    except ValueError:  # registered meanwhile under the same name
        return True
    except Exception as exc:  # a vLLM whose factory works otherwise: loading by module path still works
        log.warning("could not register %s with vLLM's KVConnectorFactory (%s); MultiConnector stats may fail",
                    NAME, exc)
        return False
    return True
