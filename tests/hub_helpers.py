"""A Hugging Face Hub cache on disk, laid out as huggingface_hub lays it, with no network.

``put_in_hub_cache`` moves a saved model folder into ``CACHE/models--ORG--NAME``: each file
becomes a blob named by its SHA-256 under ``blobs/``, ``snapshots/COMMIT/FILE`` links to it
and ``refs/main`` names the commit; huggingface_hub's own ``scan_cache_dir`` must then see it.
"""
import hashlib
import os
import shutil
from pathlib import Path


def put_in_hub_cache(folder, cache, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Copy every file of ``folder`` into the Hub cache ``cache`` as ``repo_id`` at ``commit``.

    Returns:
        the snapshot folder (``.../snapshots/COMMIT``).
    """
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for src in sorted(Path(folder).rglob("*")):
        if not src.is_file():
            continue
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        shutil.copyfile(src, blobs / digest)
        link = snapshot / src.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blobs / digest, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
