"""Registering p2pkv with SGLang: :func:`install`, :func:`uninstall` and the plugin entry point.

p2pkv declares ``p2pkv = p2pkv.adapters.sglang:plugin`` in SGLang's
plugin entry-point group ``sglang.srt.plugins``; SGLang 0.5.23 loads that
group in every process it starts (the launcher before it parses its
arguments, every scheduler), so once p2pkv is installed
``--disaggregation-transfer-backend p2pkv`` works with plain
``python -m sglang.launch_server`` (``SGLANG_PLUGINS`` may restrict which
plugins load). :func:`install` may also be called by hand.

What :func:`install` patches, and nothing else:

* ``sglang.srt.disaggregation.utils.TransferBackend`` gains a member
  ``P2PKV = "p2pkv"``;
* ``sglang.srt.disaggregation.utils.get_kv_class`` is wrapped: for
  ``TransferBackend.P2PKV`` it returns this package's classes, for every
  other backend it calls the original; the same name is rebound in the
  modules that imported it by name (``disaggregation.prefill``,
  ``disaggregation.decode``, ``managers.disagg_service``) if they are
  already imported;
* ``"p2pkv"`` is added to the ``--disaggregation-transfer-backend`` choices
  through SGLang's own extension point
  (``sglang.srt.arg_groups.choices.add_disagg_transfer_backend_choices``).

:func:`uninstall` undoes all three.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from .bootstrap import P2pkvBootstrapServer
from .manager import P2pkvKVManager
from .receiver import P2pkvKVReceiver
from .sender import P2pkvKVSender

__all__ = ["BACKEND_NAME", "install", "uninstall", "installed", "plugin"]

log = logging.getLogger("p2pkv.sglang")

BACKEND_NAME = "p2pkv"


_INSTALLED: dict[str, Any] = {}
_PATCHED_MODULES = ("sglang.srt.disaggregation.utils", "sglang.srt.disaggregation.prefill",
                    "sglang.srt.disaggregation.decode", "sglang.srt.managers.disagg_service")


def _add_enum_member(enum_cls: Any, name: str, value: str) -> Any:
    if value in enum_cls._value2member_map_:
        return enum_cls._value2member_map_[value]
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def install() -> None:
    """Register ``p2pkv`` as an SGLang transfer backend (see the module docstring for
    exactly what is patched). Idempotent; call it in every SGLang process.

    Raises
    ------
    ImportError
        sglang is not installed.
    """
    if _INSTALLED:
        return
    import importlib

    utils = importlib.import_module("sglang.srt.disaggregation.utils")
    tb = utils.TransferBackend
    member = _add_enum_member(tb, "P2PKV", BACKEND_NAME)
    kct = utils.KVClassType
    original = utils.get_kv_class
    mapping = {kct.MANAGER: P2pkvKVManager, kct.SENDER: P2pkvKVSender, kct.RECEIVER: P2pkvKVReceiver,
               kct.BOOTSTRAP_SERVER: P2pkvBootstrapServer}

    def get_kv_class(transfer_backend: Any, class_type: Any) -> Any:
        if transfer_backend is member or getattr(transfer_backend, "value", transfer_backend) == BACKEND_NAME:
            if class_type == kct.KVARGS:
                return original(transfer_backend, class_type)
            return mapping.get(class_type)
        return original(transfer_backend, class_type)

    get_kv_class.__wrapped__ = original  # type: ignore[attr-defined]
    get_kv_class.__doc__ = original.__doc__
    patched = []
    for name in _PATCHED_MODULES:
        mod = sys.modules.get(name) if name != _PATCHED_MODULES[0] else utils
        if mod is not None and getattr(mod, "get_kv_class", None) is original:
            setattr(mod, "get_kv_class", get_kv_class)  # noqa: B010 - a module of sglang, typed as ModuleType
            patched.append(name)
    choices_added = False
    try:
        choices = importlib.import_module("sglang.srt.arg_groups.choices")
        if BACKEND_NAME not in choices.DISAGG_TRANSFER_BACKEND_CHOICES:
            choices.add_disagg_transfer_backend_choices([BACKEND_NAME])
            choices_added = True
    except ImportError:  # older layouts: server_args holds the list
        sa = importlib.import_module("sglang.srt.server_args")
        lst = getattr(sa, "DISAGG_TRANSFER_BACKEND_CHOICES", None)
        if isinstance(lst, list) and BACKEND_NAME not in lst:
            lst.append(BACKEND_NAME)
            choices_added = True
    _INSTALLED.update(original=original, wrapper=get_kv_class, modules=patched, member=member,
                      choices_added=choices_added)
    log.info("p2pkv registered as SGLang transfer backend %r (patched %s)", BACKEND_NAME, ", ".join(patched))


def uninstall() -> None:
    """Undo :func:`install` (the enum member, the ``get_kv_class`` bindings, the CLI choice)."""
    if not _INSTALLED:
        return
    import importlib

    original, wrapper = _INSTALLED["original"], _INSTALLED["wrapper"]
    for name in _PATCHED_MODULES:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "get_kv_class", None) is wrapper:
            setattr(mod, "get_kv_class", original)  # noqa: B010 - a module of sglang, typed as ModuleType
    utils = importlib.import_module("sglang.srt.disaggregation.utils")
    tb = utils.TransferBackend
    if "P2PKV" in tb._member_map_:
        del tb._member_map_["P2PKV"]
        del tb._value2member_map_[BACKEND_NAME]
        tb._member_names_.remove("P2PKV")
        type.__delattr__(tb, "P2PKV")
    if _INSTALLED.get("choices_added"):
        try:
            choices = importlib.import_module("sglang.srt.arg_groups.choices")
            lst = choices.DISAGG_TRANSFER_BACKEND_CHOICES
        except ImportError:
            lst = importlib.import_module("sglang.srt.server_args").DISAGG_TRANSFER_BACKEND_CHOICES
        if BACKEND_NAME in lst:
            lst.remove(BACKEND_NAME)
    _INSTALLED.clear()


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return bool(_INSTALLED)


def plugin() -> None:
    """SGLang's plugin hook (entry point ``sglang.srt.plugins``: ``p2pkv``): :func:`install`.

    Never raises: a plugin that fails must not take SGLang down (SGLang logs
    a plugin's exception too, but says less).
    """
    try:
        install()
    except Exception as e:
        log.error("p2pkv: could not register the p2pkv transfer backend with SGLang: %s: %s", type(e).__name__, e)
