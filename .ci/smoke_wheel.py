"""Smoke test of an installed decoupleq wheel, run by .ci/wheel in a fresh venv with no C compiler.

Checks, in order: the package imports from that venv's site-packages (not a source tree), no
compiler is reachable, the vendored OpenBLAS answers (backend_info), a small layer quantizes and
the packed kernel computes what the dequantized weight does, and a quantized tiny Llama survives
save/load with identical logits.  Exits non-zero (an AssertionError) on the first failure.
"""
import logging
import os
import shutil
import sys
import sysconfig
import tempfile

log = logging.getLogger("smoke_wheel")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="smoke: %(message)s")
    for cc in ("cc", "gcc", "clang"):
        assert shutil.which(cc) is None, f"a compiler ({shutil.which(cc)}) is on the PATH: the check is void"

    import decoupleq

    site = sysconfig.get_paths()["purelib"]
    assert os.path.realpath(decoupleq.__file__).startswith(os.path.realpath(site)), (
        f"decoupleq came from {decoupleq.__file__}, not the venv's {site}")
    info = decoupleq.backend_info()
    assert "OpenBLAS" in info["blas_config"], info
    log.info("imported %s %s; BLAS %s; kernel %s", decoupleq.__file__, decoupleq.__version__,
             info["blas_config"], info["kernel"])

    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(1)
    # One layer: quantize against a Hessian, then the kernel path of QuantLinear
    # (no autograd, float32, CPU, 2 bits) against F.linear on the dequantized weight.
    layer = nn.Linear(128, 48)
    x = torch.randn(200, 128)
    acc = decoupleq.HessianAccumulator(n_features=128)
    acc.add(x.numpy())
    qw = decoupleq.quantize_weight(layer.weight.detach().numpy(), acc.hessian(),
                                   decoupleq.QuantConfig(bits=2, group_size=64))
    q = decoupleq.QuantLinear.from_quantized(layer, qw)
    with torch.no_grad():
        xs = x[:5]
        y_kernel = q(xs)
        y_ref = torch.nn.functional.linear(xs, torch.from_numpy(qw.dequantize()), layer.bias)
    err = (y_kernel - y_ref).abs().max().item()
    # The kernel sums in another order than torch's GEMM: float32 rounding only.
    assert err < 1e-4 * max(1.0, y_ref.abs().max().item()), err
    log.info("layer 128->48 W2 g64: kernel vs dequantized F.linear max |diff| %.2e", err)

    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    calib = torch.randint(2, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    decoupleq.quantize(model, calib, decoupleq.QuantConfig(bits=2, group_size=32), blockwise=False,
                       verbose=False)
    n_quant = sum(isinstance(m, decoupleq.QuantLinear) for m in model.modules())
    assert n_quant == 14, n_quant  # 7 linear layers in each of the 2 blocks
    ids = torch.randint(2, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny.safetensors")
        decoupleq.save(model, path)
        loaded = decoupleq.load(path)
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after), (before - after).abs().max().item()
    assert np.isfinite(after.numpy()).all()
    log.info("tiny Llama W2 g32: %d layers quantized, save/load logits identical", n_quant)
    log.info("python %s: all checks passed", sys.version.split()[0])


if __name__ == "__main__":
    main()
