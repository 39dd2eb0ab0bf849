"""Hugging Face Hub ids (``"org/name[@revision]"``) resolved to a local snapshot folder.

The Hub cache is read first, so a model downloaded once (by ``hf download``, transformers or
anything using ``huggingface_hub``) loads with no network. A download is tried only when the
model is not cached, the caller allows it and the hub client is online. Nothing here sets or
clears environment variables: offline mode is the user's ``HF_HUB_OFFLINE``, read as it is.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Optional

logger = logging.getLogger(__name__)

# huggingface_hub's own rule for repo ids, with the namespace made compulsory: a bare
# "name" is far more likely a mistyped packaged model or file than a legacy Hub repo.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*(@[\w.\-/]+)?$")

# What a download fetches: configuration, tokenizer and safetensors weights, not every
# GGUF quantization or framework checkpoint a repository may also hold.
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def looks_like_hub_id(text) -> bool:
    """True for ``"org/name"`` or ``"org/name@revision"`` (not ``--`` or ``..``, at most 96 chars)."""
    if not isinstance(text, str):
        return False
    repo = text.split("@", 1)[0]
    return bool(_HUB_ID.match(text)) and len(repo) <= 96 and "--" not in repo and ".." not in repo


def split_hub_id(text: str) -> tuple:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; the revision is None when absent."""
    repo, _, rev = text.partition("@")
    return repo, (rev or None)


def _client_offline() -> bool:
    from huggingface_hub import constants

    # The constant is read at import time; the variable may have been set since.
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or env in {"1", "ON", "YES", "TRUE"}


def resolve_hub_id(hub_id: str, *, cache_dir=None, local_files_only: Optional[bool] = None) -> str:
    """The local snapshot folder of a Hub model, from the cache or (if allowed) downloaded.

    Args:
        hub_id: ``"org/name"`` or ``"org/name@revision"`` (branch, tag or commit).
        cache_dir: the Hub cache folder; default the hub client's (``$HF_HUB_CACHE``,
            ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``).
        local_files_only: never download; default: only when the hub client is offline.

    Returns:
        str, the snapshot folder (``.../models--org--name/snapshots/COMMIT``).

    Raises:
        ValueError: ``hub_id`` is not of the form ``org/name[@revision]``.
        ImportError: ``huggingface_hub`` is not installed.
        FileNotFoundError: not cached, and no download was allowed or it failed; the
            message names the id, the cache searched and how to fill it.
    """
    if not looks_like_hub_id(hub_id):
        raise ValueError(f"hub_id must look like 'org/name' or 'org/name@revision', got {hub_id!r}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import constants
    except ImportError as exc:  # a dependency of transformers, so rarely missing
        raise ImportError("resolving a Hugging Face Hub id needs huggingface_hub: pip install huggingface_hub") from exc
    repo, revision = split_hub_id(hub_id)
    cache = str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True)
        logger.info("%s: found in the Hub cache at %s", hub_id, folder)
        return folder
    except (FileNotFoundError, _local_entry_error()) as exc:
        missing = exc
    offline = _client_offline()
    if local_files_only or (local_files_only is None and offline):
        why = "HF_HUB_OFFLINE is set" if offline and not local_files_only else "downloads were not allowed"
        raise FileNotFoundError(
            f"Hugging Face model {hub_id!r} is not in the Hub cache {cache} and {why}: "
            f"download it first where there is network (hf download {repo}"
            + (f" --revision {revision}" if revision else "")
            + "), point HF_HUB_CACHE at a cache that holds it, or pass a local model folder"
        ) from missing
    logger.info("%s: not in the Hub cache %s, downloading", hub_id, cache)
    try:
        return snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=_DOWNLOAD_PATTERNS)
    except Exception as exc:  # the hub client raises many types; all mean "not available here"
        raise FileNotFoundError(
            f"Hugging Face model {hub_id!r} is not in the Hub cache {cache} and could not be downloaded "
            f"({type(exc).__name__}: {exc}); download it where there is network or pass a local model folder"
        ) from exc


def _local_entry_error():
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # huggingface_hub < 0.23 kept its errors in utils
        from huggingface_hub.utils import LocalEntryNotFoundError
    return LocalEntryNotFoundError
