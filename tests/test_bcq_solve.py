"""decoupleq.bcq_solve.decoupleq_bcq on layers of a tiny Llama with their captured Hessians:
never above its start, better than UniQuanF's initialisation and min-max RTN under H, the
C core equal to the NumPy twin, and the result saved, loaded and served as a BCQ layer."""
import numpy as np
import pytest
import torch

from decoupleq import HessianAccumulator, QuantConfig, damp, quantize_weight
from decoupleq.bcq import BCQWeight
from decoupleq.bcq_solve import decoupleq_bcq
from decoupleq.io import load, save
from decoupleq.nn_bcq import BCQLinear

from _pipeline_models import logits, one_thread, tiny_llama, token_batches


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def captured(model, names):
    """{name: (W float32, H float64)} from the inputs the model feeds each layer on token batches."""
    accs, hooks = {}, []
    for name in names:
        lin = model.get_submodule(name)
        acc = accs[name] = HessianAccumulator(lin.in_features)
        hooks.append(lin.register_forward_hook(lambda mod, i, o, acc=acc: acc.add(i[0].reshape(-1, i[0].shape[-1]))))
    with torch.no_grad():
        model(token_batches(n=8, seq=24))
    for h in hooks:
        h.remove()
    return {n: (model.get_submodule(n).weight.detach().numpy().copy(), accs[n].hessian()) for n in names}


@pytest.fixture(scope="module")
def model_and_layers():
    with one_thread():
        model = tiny_llama(seed=5, layers=1)
        return model, captured(model, LAYERS)


def h_error(W, What, H00):
    D = What.astype(np.float64) - W.astype(np.float64)
    return float(np.sum((D @ H00) * D))


@pytest.mark.parametrize("bits,gs", [(2, 16), (3, 32), (2, -1)])
def test_beats_its_start_and_minmax_rtn_on_real_layers(model_and_layers, bits, gs):
    _, layers = model_and_layers
    for name, (W, H) in layers.items():
        res = decoupleq_bcq(W, H, bits, gs, iters=3)
        H00 = damp(H, 0.01)
        np.testing.assert_allclose(res.loss, [h_error(W[r:r + 1], res.weight.dequantize()[r:r + 1], H00)
                                              for r in range(W.shape[0])], rtol=1e-9, atol=1e-15)
        assert np.all(res.loss <= res.start_loss), name
        assert np.all(np.diff(res.history) <= 0), res.history
        np.testing.assert_allclose(res.history[0], res.start_loss.sum(), rtol=1e-9)
        rtn = float(quantize_weight(W, H, QuantConfig(method="rtn", bits=bits, group_size=gs)).loss.sum())
        assert res.loss.sum() < 0.9 * res.start_loss.sum(), (name, res.history)
        assert res.loss.sum() < rtn, (name, res.loss.sum(), rtn)


def test_c_and_reference_agree_from_torch_inputs(model_and_layers):
    _, layers = model_and_layers
    W, H = layers["model.layers.0.self_attn.q_proj"]
    Wt, Ht = torch.from_numpy(W.copy()), torch.from_numpy(H.copy())
    c = decoupleq_bcq(Wt, Ht, 2, 16, iters=2)
    r = decoupleq_bcq(W, H, 2, 16, iters=2, impl="reference")
    assert np.mean(c.weight.indices == r.weight.indices) >= 0.999
    assert abs(c.loss.sum() / r.loss.sum() - 1) <= 1e-6
    assert torch.equal(Wt, torch.from_numpy(W)) and torch.equal(Ht, torch.from_numpy(H))


def test_explicit_start_and_float_step_only(model_and_layers):
    _, layers = model_and_layers
    W, H = layers["model.layers.0.mlp.up_proj"]
    first = decoupleq_bcq(W, H, 3, 32, iters=1)
    again = decoupleq_bcq(W, H, 3, 32, iters=0, start=first.weight)
    np.testing.assert_allclose(again.start_loss, first.loss, rtol=1e-12)
    assert np.all(again.loss <= first.loss)
    assert again.history.shape == (2,)


def test_bad_arguments_are_named_before_any_work(model_and_layers):
    _, layers = model_and_layers
    W, H = layers["model.layers.0.self_attn.q_proj"]
    keep = (W.copy(), H.copy())
    other = BCQWeight(np.zeros((W.shape[0], W.shape[1]), np.uint8), np.ones((W.shape[0], 1, 3), np.float32),
                      np.zeros((W.shape[0], 1), np.float32), 3, -1)
    cases = [
        (dict(bits=5), "bits"),
        (dict(bits=1), "bits"),
        (dict(group_size=7), "group_size"),
        (dict(iters=-1), "iters"),
        (dict(H=H[:8, :8]), "H"),
        (dict(impl="gpu"), "impl"),
        (dict(init_weighting="full"), "init_weighting"),
        (dict(start=other), "start"),
        (dict(start="minmax"), "start"),
        (dict(W=np.full_like(W, np.nan)), "W"),
    ]
    for change, name in cases:
        a = dict(W=W, H=H, bits=2, group_size=16)
        a.update(change)
        W_, H_, bits, gs = a.pop("W"), a.pop("H"), a.pop("bits"), a.pop("group_size")
        with pytest.raises((TypeError, ValueError), match=name):
            decoupleq_bcq(W_, H_, bits, gs, **a)
    np.testing.assert_array_equal(W, keep[0])
    np.testing.assert_array_equal(H, keep[1])


def test_result_saves_loads_and_runs_as_a_bcq_layer(model_and_layers, tmp_path):
    model, layers = model_and_layers
    model = tiny_llama(seed=5, layers=1)  # a fresh copy with the same weights
    ids = token_batches(n=2, seq=16, seed=3)
    for name, (W, H) in layers.items():
        lin = model.get_submodule(name)
        res = decoupleq_bcq(W, H, 2, 16, iters=1)
        layer = BCQLinear.from_bcq(lin, res.weight, method="decoupleq-bcq")
        # The served layer computes x W_hat^T with the refined weight.
        x = torch.randn(3, lin.in_features)
        want = x @ torch.from_numpy(res.weight.dequantize()).T
        if lin.bias is not None:
            want = want + lin.bias
        with torch.no_grad():
            torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    path = tmp_path / "model.safetensors"
    save(model, path)
    loaded = load(path)
    for name in LAYERS:
        got = loaded.get_submodule(name)
        assert isinstance(got, BCQLinear)
        assert got.quant_info()["method"] == "decoupleq-bcq"
    assert torch.equal(logits(loaded, ids), logits(model, ids))
