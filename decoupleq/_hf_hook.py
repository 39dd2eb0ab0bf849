"""Register decoupleq with transformers without importing either torch or transformers early.

``import decoupleq`` must not cost a torch + transformers import (seconds) for
users of the NumPy core alone, yet ``from_pretrained`` must know decoupleq's
quantization method afterwards. So: if transformers is already imported,
register now; otherwise a one-shot import hook (``sys.meta_path``) registers
right after transformers' own package has been executed. Nothing of
transformers is patched: registration goes through its public
``register_quantization_config`` / ``register_quantizer``.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

log = logging.getLogger(__name__)


def _register() -> None:
    try:
        from . import hf_quantizer  # noqa: F401  (registers on import)
    except Exception as exc:  # a transformers without these extension points: say so, break nothing
        log.warning("decoupleq could not register with transformers (%s: %s); from_pretrained will not "
                    "read decoupleq folders", type(exc).__name__, exc)


class _Loader(importlib.abc.Loader):
    """transformers' own loader, and the registration once its package has run."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        # The real loader stays the module's loader (resources, reloads): only this call passes here.
        module.__spec__.loader = self._inner
        module.__loader__ = self._inner
        self._inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        _remove_finder()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


def install() -> None:
    if "transformers" in sys.modules:
        _register()
    elif importlib.util.find_spec("transformers") is not None and not any(
        isinstance(f, _Finder) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _Finder())


def attach(model):
    """``decoupleq.hf_quantizer.attach`` for a transformers model (which means transformers is
    imported already); any other module is returned as it is, importing nothing."""
    if "transformers" not in sys.modules:
        return model
    from .hf_quantizer import attach as _attach

    return _attach(model)
