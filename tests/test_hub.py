"""Hugging Face Hub ids: resolved from a real Hub cache layout on disk (no network, no mocks)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from decoupleq import cli, zoo
from decoupleq.hub import looks_like_hub_id, resolve_hub_id, split_hub_id
from hub_helpers import put_in_hub_cache
from zoo_helpers import read, saved_tiny_llama, tiny_llama, train_tokenizer

REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(cache folder, the float model put in it)."""
    saved = tmp_path_factory.mktemp("saved")
    model = saved_tiny_llama(saved, text_chars=40_000, vocab_size=270, seed=9, hidden=32)
    cache = tmp_path_factory.mktemp("hub-cache")
    put_in_hub_cache(saved, cache, REPO_ID, COMMIT)
    return cache, model


def test_the_cache_layout_is_the_hub_clients_own(hub):
    from huggingface_hub import scan_cache_dir

    cache, _ = hub
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO_ID and repo.repo_type == "model"
    (rev,) = repo.revisions
    assert rev.commit_hash == COMMIT and "main" in rev.refs
    assert {f.file_name for f in rev.files} >= {"config.json", "model.safetensors", "tokenizer.json"}


@pytest.mark.parametrize("text,ok", [
    ("org/name", True), ("HuggingFaceTB/SmolLM2-135M", True), ("org/name@main", True),
    ("org/name@v1.0", True), ("name", False), ("org/", False), ("/abs/path", False),
    ("org/na--me", False), ("org/../x", False), ("a/b/c", False), ("org/name.gguf/x", False), (3, False),
])
def test_hub_id_shapes(text, ok):
    assert looks_like_hub_id(text) is ok


def test_split_revision():
    assert split_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert split_hub_id("org/name") == ("org/name", None)


def test_load_model_from_the_hub_cache_leaves_the_environment_alone(hub):
    cache, model = hub
    env = dict(os.environ)
    for spec in (REPO_ID, f"{REPO_ID}@{COMMIT}", f"{REPO_ID}@main"):
        lm = zoo.load_model(spec, hub_cache_dir=cache, local_files_only=True)
        assert lm.name == spec and lm.extra["hub_id"] == spec and lm.kind == zoo.CAUSAL_LM
        assert lm.source.endswith(os.path.join("snapshots", COMMIT))
        got = lm.model.state_dict()
        assert all(torch.equal(v, got[k]) for k, v in model.state_dict().items())
    assert dict(os.environ) == env  # no HF_HUB_OFFLINE (or anything else) left behind


def test_missing_hub_model_names_the_cache_and_the_fix(hub, tmp_path):
    cache, _ = hub
    with pytest.raises(FileNotFoundError, match=r"'tiny-org/absent' is not in the Hub cache .*hf download tiny-org/absent"):
        zoo.load_model("tiny-org/absent", hub_cache_dir=cache, local_files_only=True)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        resolve_hub_id(REPO_ID, cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(FileNotFoundError, match="--revision v9"):
        resolve_hub_id(f"{REPO_ID}@v9", cache_dir=cache, local_files_only=True)
    with pytest.raises(ValueError, match="hub_id"):
        resolve_hub_id("not-an-id", cache_dir=cache)


def test_a_local_folder_wins_over_a_hub_id_of_the_same_spelling(hub, tmp_path, monkeypatch):
    cache, model = hub
    other = tiny_llama(vocab_size=model.config.vocab_size, seed=10, hidden=32)
    local = tmp_path / REPO_ID
    other.save_pretrained(local)
    train_tokenizer(read("wikitext-2/valid.txt", limit=20_000), vocab_size=270).save_pretrained(local)
    monkeypatch.chdir(tmp_path)
    lm = zoo.load_model(REPO_ID, hub_cache_dir=cache, local_files_only=True)
    assert "hub_id" not in lm.extra
    assert torch.equal(lm.model.lm_head.weight, other.lm_head.weight)


def _cli(args, cache, tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "decoupleq", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)


def test_cli_quantizes_and_compares_a_hub_id_offline(hub, tmp_path):
    cache, _ = hub
    out = tmp_path / "q"
    res = _cli(["quantize", REPO_ID, "--method", "rtn", "--no-blockwise", "--bits", "4", "--group-size", "16",
                "--out", str(out), "-q"], cache, tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / cli.SUMMARY_FILE).read_text())
    assert summary["model"] == REPO_ID and summary["layers"] == 14
    text = tmp_path / "t.txt"
    text.write_text(read("wikitext-2/test.txt", limit=20_000))
    # --compare reloads the full-precision model by the stored Hub id, from the same cache.
    res = _cli(["eval", str(out), "--text", str(text), "--seq-len", "32", "--max-windows", "2", "--compare"],
               cache, tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"vs {REPO_ID}: KL" in res.stdout

    res = _cli(["quantize", "tiny-org/absent", "--out", str(tmp_path / "q2")], cache, tmp_path)
    assert res.returncode == 2
    assert "'tiny-org/absent' is not in the Hub cache" in res.stderr and "HF_HUB_OFFLINE is set" in res.stderr
    assert not (tmp_path / "q2").exists()
