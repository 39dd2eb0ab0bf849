"""What every benchmark's ``--json`` output records about the run that made it.

A figure is only reproducible if its record says which code, which settings,
how many threads and which library versions produced it: ``run_info`` gathers
these, ``dump_json`` writes a benchmark's records with them (each record of a
list gets a ``"run"`` key, a dict gets one at the top level).

    from provenance import dump_json
    dump_json(args.json, records, args)
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("decoupleq", "numpy", "torch", "transformers", "safetensors", "accelerate",
            "scipy-openblas32", "gguf")
THREAD_ENV = ("DECOUPLEQ_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
              "DECOUPLEQ_KERNEL", "DECOUPLEQ_THREAD_POOL")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _threads() -> dict:
    info = {"cpus": os.cpu_count(), "env": {k: os.environ.get(k) for k in THREAD_ENV}}
    try:
        import decoupleq

        b = decoupleq.backend_info()
        info.update(blas_threads=b.get("blas_threads"), core_threads=b.get("core_threads"),
                    kernel=b.get("kernel"), blas=b.get("blas_config"))
    except Exception as exc:  # the record still says what it could not find
        info["backend_error"] = repr(exc)
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    return info


def _config(args) -> dict | None:
    if args is None:
        return None
    items = vars(args) if hasattr(args, "__dict__") else dict(args)
    return {k: (v if isinstance(v, (bool, int, float, str, type(None), list, tuple, dict)) else str(v))
            for k, v in items.items()}


def run_info(args=None, **extra) -> dict:
    """Commit, full configuration, thread counts and versions of this run.

    Args:
        args: the benchmark's parsed arguments (an ``argparse.Namespace`` or a
            dict); recorded in full, with the command line.
        extra: more configuration the arguments do not show (resolved
            defaults, derived settings).
    """
    try:
        import decoupleq

        module = decoupleq.__file__
    except Exception:
        module = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "decoupleq_module": module,
        "argv": list(sys.argv),
        "config": _config(args),
        "extra_config": extra or None,
        "threads": _threads(),
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "platform": {"machine": platform.machine(), "system": platform.platform(),
                     "processor": _cpu_model()},
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def stamp(payload, info: dict):
    """``payload`` with ``info`` under ``"run"``: in each record of a list, or at
    the top of a dict."""
    if isinstance(payload, list):
        return [{**r, "run": info} if isinstance(r, dict) else r for r in payload]
    if isinstance(payload, dict):
        return {**payload, "run": info}
    raise TypeError(f"payload must be a list of records or a dict, got {type(payload).__name__}")


def dump_json(path, payload, args=None, **extra) -> None:
    """Write ``payload`` (a list of records or a dict) to ``path`` as JSON, each
    record carrying ``run_info(args, **extra)``."""
    Path(path).write_text(json.dumps(stamp(payload, run_info(args, **extra)), indent=1, default=str) + "\n")
