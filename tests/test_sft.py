"""SFT of the float parts: the autograd Function, prepare_for_sft, training loops, save/load after SFT."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import decoupleq
from decoupleq.config import QuantConfig
from decoupleq.nn import QuantConv2d, QuantLinear
from decoupleq.sft import QuantLinearFunction, prepare_for_sft, quant_linear, sft_parameter_count

from _pipeline_models import one_thread

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny shapes gain nothing from threads, and on a shared 2-core machine
    # oversubscribed thread pools make every small op tens of times slower.
    with one_thread():
        yield


# ---------------------------------------------------------------------------
# Helpers: an independent min-max RTN to build quantized layers without the solver
# ---------------------------------------------------------------------------


class _QW:
    def __init__(self, codes, scale, zero, config):
        self.codes, self.scale, self.zero, self.config = codes, scale, zero, config


def rtn_weight(W, bits, group_size, symmetric):
    """codes int8 (out, in), scale/zero float32 (out, G) by plain min-max rounding."""
    out_f, in_f = W.shape
    g = 1 if group_size == -1 else in_f // group_size
    Wg = W.detach().float().reshape(out_f, g, in_f // g)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        s = Wg.abs().amax(-1) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.zeros_like(s)
    else:
        mn, mx = Wg.amin(-1), Wg.amax(-1)
        s = (mx - mn) / (qmax - qmin)
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = mn - qmin * s
    codes = torch.round((Wg - z.unsqueeze(-1)) / s.unsqueeze(-1)).clamp(qmin, qmax).to(torch.int8)
    cfg = QuantConfig(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric)
    return _QW(codes.reshape(out_f, in_f), s.contiguous(), z.contiguous(), cfg)


def quantize_linears(model, bits=2, group_size=8, symmetric=False, skip=("lm_head",)):
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.split(".")[-1] not in skip:
            q = QuantLinear.from_quantized(mod, rtn_weight(mod.weight, bits, group_size, symmetric))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **kw,
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    return model


def quantized_llama(seed=0, symmetric=False):
    return quantize_linears(tiny_llama(seed), bits=2, group_size=8, symmetric=symmetric)


def token_batch(vocab=67, batch=3, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def quant_inputs(out_f, in_f, group_size, dtype, seed=0, symmetric=False, bias=True):
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else in_f // group_size
    codes = torch.randint(-2, 2, (out_f, in_f), generator=g).to(torch.int8)
    scale = (torch.rand(out_f, n_groups, generator=g) + 0.1).to(dtype)
    zero = None if symmetric else torch.randn(out_f, n_groups, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    return codes, scale, zero, b


def reference_linear(x, codes, scale, zero, bias, group_size):
    """y = x W^T + b with W built by plain torch ops (autograd does the gradients)."""
    out_f, in_f = codes.shape
    g = scale.shape[1]
    w = codes.to(scale.dtype).reshape(out_f, g, in_f // g) * scale.unsqueeze(-1)
    if zero is not None:
        w = w + zero.unsqueeze(-1)
    return F.linear(x, w.reshape(out_f, in_f), bias)


# ---------------------------------------------------------------------------
# The autograd Function
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "out_f,in_f,group_size,symmetric,tile_rows",
    [
        (7, 12, -1, False, None),  # per-channel
        (7, 12, 4, False, None),  # grouped
        (7, 33, 11, False, 2),  # grouped, tiles of 2 rows with a short last tile
        (5, 12, 3, True, 3),  # symmetric grouped: no zero, no zero gradient
        (1, 7, -1, True, None),  # one row, symmetric per-channel
        (9, 8, 8, False, 1),  # one row per tile
    ],
)
def test_gradcheck_float64(out_f, in_f, group_size, symmetric, tile_rows):
    codes, scale, zero, bias = quant_inputs(out_f, in_f, group_size, torch.float64, symmetric=symmetric)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    scale.requires_grad_(True)
    bias.requires_grad_(True)
    if zero is not None:
        zero.requires_grad_(True)

    def f(x, scale, zero, bias):
        return quant_linear(x, codes, scale, zero, bias, group_size, tile_rows=tile_rows)

    assert torch.autograd.gradcheck(f, (x, scale, zero, bias))
    y = f(x, scale, zero, bias)
    torch.testing.assert_close(y, reference_linear(x, codes, scale, zero, bias, group_size), rtol=1e-12, atol=1e-12)


def test_gradcheck_partial_requirements():
    # Only the scale needs a gradient: x and zero are constants, no bias.
    codes, scale, zero, _ = quant_inputs(9, 16, 4, torch.float64, bias=False)
    x = torch.randn(5, 16, dtype=torch.float64)
    scale.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: quant_linear(x, codes, s, zero, None, 4, tile_rows=4), (scale,))
    # Only x: the frozen quantized layer must still pass gradients to earlier layers.
    x.requires_grad_(True)
    scale.requires_grad_(False)
    assert torch.autograd.gradcheck(lambda x: quant_linear(x, codes, scale, zero, None, 4, tile_rows=2), (x,))


def test_symmetric_has_no_zero_gradient():
    codes, scale, _, bias = quant_inputs(6, 12, 4, torch.float32, symmetric=True)
    scale.requires_grad_(True)
    x = torch.randn(4, 12, requires_grad=True)
    y = quant_linear(x, codes, scale, None, bias, 4)
    grads = torch.autograd.grad(y.square().sum(), (x, scale))
    ref_s = scale.detach().clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = reference_linear(ref_x, codes, ref_s, None, bias, 4)
    ref_grads = torch.autograd.grad(ref.square().sum(), (ref_x, ref_s))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile_rows", [None, 1, 5])
def test_float32_matches_autograd_through_dequantize(tile_rows):
    out_f, in_f, gs = 13, 24, 8
    codes, scale, zero, bias = quant_inputs(out_f, in_f, gs, torch.float32, seed=3)
    codes[0] = 0  # an all-zero row
    codes[1] = -2  # a constant row
    scale[2, 1] = 1e4  # one huge scale
    x = torch.randn(2, 7, in_f)
    x[0, 0] = 0.0
    leaves = [t.clone().requires_grad_(True) for t in (x, scale, zero, bias)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, scale, zero, bias)]
    y = quant_linear(leaves[0], codes, *leaves[1:], gs, tile_rows=tile_rows)
    ref = reference_linear(ref_leaves[0], codes, *ref_leaves[1:], gs)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, gy)
    want = torch.autograd.grad(ref, ref_leaves, gy)
    for name, a, b in zip(("x", "scale", "zero", "bias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


def test_no_float_weight_is_saved_for_backward():
    out_f, in_f = 24, 40
    layer = QuantLinear(in_f, out_f, bits=2, group_size=8, bias=True)
    with torch.no_grad():
        layer.set_codes(torch.randint(-2, 2, (out_f, in_f)).to(torch.int8))
        layer.scale.uniform_(0.5, 1.5)
    x = torch.randn(3, in_f, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert y.grad_fn is not None
    floats_of_weight_size = [s for s in saved if s[0] == (out_f, in_f) and s[1].is_floating_point]
    assert floats_of_weight_size == [], saved
    y.sum().backward()
    assert x.grad is not None and layer.scale.grad is not None and layer.zero.grad is not None


def test_autocast_bfloat16_saves_input_as_given_and_computes_in_float32():
    codes, scale, zero, bias = quant_inputs(10, 16, 4, torch.float32, seed=5)
    scale.requires_grad_(True)
    zero.requires_grad_(True)
    x = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = quant_linear(x, codes, scale, zero, bias, 4)
    assert y.dtype == torch.bfloat16
    x_like = [t.dtype for t in saved if t.shape == x.shape]
    assert x_like == [torch.bfloat16]  # the bf16 input itself, no float32 copy of it
    # float32 arithmetic: the result is the float32 product rounded once to bf16.
    ref = reference_linear(x.detach().float(), codes, scale.detach(), zero.detach(), bias, 4)
    assert torch.equal(y.detach(), ref.to(torch.bfloat16))
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and scale.grad.dtype == torch.float32
    ref_s = scale.detach().clone().requires_grad_(True)
    reference_linear(x.detach().float(), codes, ref_s, zero.detach(), bias, 4).sum().backward()
    torch.testing.assert_close(scale.grad, ref_s.grad, rtol=1e-5, atol=1e-4)


def test_quant_linear_rejects_bad_arguments():
    codes, scale, zero, bias = quant_inputs(4, 8, 4, torch.float32)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="group_size must be -1 .per-channel. or positive, got 0"):
        quant_linear(x, codes, scale, zero, bias, 0)
    # 3 is a valid size over 8 inputs (3 + 3 + 2), but it makes 3 groups, not scale's 2.
    with pytest.raises(ValueError, match=r"scale has shape \(4, 2\) \(torch.float32\), expected float \(4, 3\)"):
        quant_linear(x, codes, scale, zero, bias, 3)
    with pytest.raises(ValueError, match="x has shape"):
        quant_linear(torch.randn(2, 7), codes, scale, zero, bias, 4)
    with pytest.raises(TypeError, match="codes"):
        quant_linear(x, codes.float(), scale, zero, bias, 4)
    with pytest.raises(ValueError, match="scale has shape"):
        quant_linear(x, codes, scale[:, :1], zero, bias, 4)
    with pytest.raises(ValueError, match="zero has shape"):
        quant_linear(x, codes, scale, zero.t(), bias, 4)
    with pytest.raises(ValueError, match="bias has shape"):
        quant_linear(x, codes, scale, zero, bias[:3], 4)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        quant_linear(x.long(), codes, scale, zero, bias, 4)
    with pytest.raises(ValueError, match="tile_rows"):
        quant_linear(x, codes, scale, zero, bias, 4, tile_rows=0)


def _uses_function(y):
    """Whether the autograd graph of ``y`` contains a QuantLinearFunction node."""
    todo, seen = [y.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__.startswith(QuantLinearFunction.__name__):
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


def test_quantlinear_routes_to_the_function_only_when_training():
    layer = QuantLinear(8, 5, bits=2, group_size=4, bias=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    layer.scale.requires_grad_(False)
    layer.zero.requires_grad_(False)
    assert layer(x).grad_fn is None  # nothing needs a gradient: the inference path
    assert _uses_function(layer(x.requires_grad_(True)))  # a frozen layer still passes gradients to x
    layer.scale.requires_grad_(True)
    assert _uses_function(layer(x.detach()[None]))


# ---------------------------------------------------------------------------
# prepare_for_sft
# ---------------------------------------------------------------------------


def _expected_float_parts(model, zeros=True):
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            g = m.in_features // 8
            n += m.out_features * g * (2 if zeros and not m.symmetric else 1)
    return n


def test_prepare_for_sft_trains_float_parts_and_norms_only():
    model = quantized_llama()
    cfg = model.config
    params = prepare_for_sft(model)
    ids = {id(p) for p in params}
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert {n for n, p in named.items() if id(p) in ids} == trainable
    for n in trainable:
        assert n.endswith((".scale", ".zero")) or "norm" in n, n
    assert not any(n.endswith(".codes") for n in named)
    assert all(m.codes.dtype == torch.int8 for m in model.modules() if isinstance(m, QuantLinear))
    assert not named["model.embed_tokens.weight"].requires_grad and not named["lm_head.weight"].requires_grad
    # 7 linears per layer; norms: 2 per layer plus the final one.
    n_norm = cfg.hidden_size * (2 * cfg.num_hidden_layers + 1)
    assert sum(p.numel() for p in params) == _expected_float_parts(model) + n_norm
    counts = sft_parameter_count(model)
    assert counts["trainable"] == sum(p.numel() for p in params)
    assert counts["model"] == sum(p.numel() for p in tiny_llama().parameters()) + _expected_float_parts(model)


def test_prepare_for_sft_flags():
    model = quantized_llama(symmetric=True)
    params = prepare_for_sft(model, scales=True, zeros=True, norms=False)
    assert all(p.requires_grad for p in params)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert {id(p) for p in params} == {id(m.scale) for m in quant}  # symmetric: zeros stay fixed
    assert not any(m.zero.requires_grad for m in quant)

    lin = nn.Sequential(nn.Linear(8, 6, bias=True), nn.LayerNorm(6), nn.Linear(6, 4))
    quantize_linears(lin, group_size=2, skip=())
    params = prepare_for_sft(lin, scales=False, zeros=False, norms=True, biases=True)
    assert {id(p) for p in params} == {id(lin[0].bias), id(lin[2].bias), id(lin[1].weight), id(lin[1].bias)}
    assert not lin[0].scale.requires_grad and not lin[0].zero.requires_grad


def test_prepare_for_sft_rejects_bad_input():
    with pytest.raises(TypeError, match="model"):
        prepare_for_sft("not a model")
    with pytest.raises(ValueError, match="no QuantLinear"):
        prepare_for_sft(tiny_llama())
    model = quantized_llama()
    with pytest.raises(TypeError, match="norms"):
        prepare_for_sft(model, norms=1)
    with pytest.raises(ValueError, match="nothing to train"):
        prepare_for_sft(model, scales=False, zeros=False, norms=False)
    assert all(p.requires_grad for p in model.parameters())  # untouched after a refusal


# ---------------------------------------------------------------------------
# Training loops
# ---------------------------------------------------------------------------


def _frozen_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".scale", ".zero")) and "norm" not in k}


def _train(model, params, ids, steps, autocast=False, lr=3e-2):
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("autocast", [False, True])
def test_plain_loop_lowers_the_loss_and_only_moves_float_parts(autocast):
    model = quantized_llama()
    ids = token_batch()
    frozen = _frozen_state(model)
    scales_before = [m.scale.detach().clone() for m in model.modules() if isinstance(m, QuantLinear)]
    params = prepare_for_sft(model)
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss.item()
    _train(model, params, ids, steps=8, autocast=autocast)
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss.item()
    assert after < before - 0.05, (before, after)
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    scales_after = [m.scale for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(s.dtype == torch.float32 for s in scales_after)
    assert all(not torch.equal(a, b) for a, b in zip(scales_before, scales_after))


def test_quant_conv2d_float_parts_train():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    qc = QuantConv2d.from_quantized(conv, rtn_weight(conv.weight.reshape(5, -1), 2, -1, False))
    model = nn.Sequential(qc, nn.BatchNorm2d(5))
    params = prepare_for_sft(model)
    assert {id(p) for p in params} == {id(qc.scale), id(qc.zero), id(model[1].weight), id(model[1].bias)}
    x = torch.randn(2, 3, 6, 6)
    model(x).square().mean().backward()
    assert qc.scale.grad is not None and qc.zero.grad is not None and qc.bias.grad is None


@pytest.mark.parametrize("bf16", [False, True])
def test_hf_trainer_runs_a_few_steps(tmp_path, bf16):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from torch.utils.data import Dataset

    class Windows(Dataset):
        def __init__(self, ids):
            self.ids = ids

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    model = quantized_llama()
    frozen = _frozen_state(model)
    params = prepare_for_sft(model)
    before = [p.detach().clone() for p in params]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, bf16=bf16,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Windows(token_batch(batch=8)))
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    result = trainer.train()
    hook.remove()
    assert set(seen) == {torch.bfloat16 if bf16 else torch.float32}  # autocast reached the quantized layers
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in params}
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert list(tmp_path.glob("checkpoint-*")) == []


# ---------------------------------------------------------------------------
# After SFT: save / load, and the inference path
# ---------------------------------------------------------------------------


def test_save_load_after_sft_gives_identical_logits(tmp_path):
    model = quantized_llama()
    ids = token_batch()
    _train(model, prepare_for_sft(model), ids, steps=3)
    path = tmp_path / "sft.safetensors"
    decoupleq.save(model, path)
    loaded = decoupleq.load(path)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.equal(got, want)
    tuned = {k: v for k, v in model.state_dict().items() if k.endswith((".scale", ".zero")) or "norm" in k}
    got_sd = loaded.state_dict()
    assert all(torch.equal(got_sd[k], v) for k, v in tuned.items())
    # Loading into a fresh full-precision model of the same architecture gives the same too.
    into = decoupleq.load(path, model=tiny_llama(seed=7))
    with torch.no_grad():
        assert torch.equal(into(input_ids=ids).logits, want)


def test_inference_path_uses_the_tuned_float_parts():
    model = quantized_llama()
    ids = token_batch()
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        layer(x)  # let any inference cache be built before tuning
    _train(model, prepare_for_sft(model), ids, steps=3)
    with torch.no_grad():
        got = layer(x)
        want = reference_linear(x, layer.codes, layer.scale, layer.zero, layer.bias, layer.group_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_packed_kernels_with_tuned_float_parts():
    packing = pytest.importorskip("decoupleq.packing", reason="packed kernels not merged on this branch")
    kernels = pytest.importorskip("decoupleq.kernels")
    model = quantized_llama()
    _train(model, prepare_for_sft(model), token_batch(), steps=3)
    layer = model.model.layers[1].self_attn.q_proj
    x = torch.randn(4, layer.in_features)
    packed = packing.PackedWeight(
        codes=packing.pack(layer.codes.numpy(), layer.bits), scale=layer.scale.detach().numpy().copy(),
        zero=layer.zero.detach().numpy().copy(), bits=layer.bits, in_features=layer.in_features,
        group_size=layer.group_size,
    )
    got = kernels.packed_linear(x, packed)
    with torch.no_grad():
        want = quant_linear(x, layer.codes, layer.scale, layer.zero, None, layer.group_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
