"""Differences between the transformers versions the project supports (see pyproject.toml).

transformers renamed ``from_pretrained(torch_dtype=...)`` to ``dtype=`` in 4.56. Older
versions do not know ``dtype`` and keep any unknown keyword as a *config attribute*: the
model then carries ``config.dtype = torch.float32``, and the first ``to_json_string`` of that
config (``decoupleq.save`` stores it) fails with "Object of type dtype is not JSON
serializable". Newer versions still take ``torch_dtype`` but warn that it is deprecated.
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _has_dtype_keyword() -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__.split("+")[0]) >= Version("4.56.0.dev0")


def dtype_kwargs(dtype) -> dict:
    """``{"dtype": dtype}`` or ``{"torch_dtype": dtype}``, whichever this transformers reads,
    for ``from_pretrained`` and ``from_config``."""
    return {"dtype": dtype} if _has_dtype_keyword() else {"torch_dtype": dtype}
