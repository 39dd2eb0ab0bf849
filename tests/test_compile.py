"""torch.compile of quantized models: the C kernels as registered ops, no graph breaks.

A 2-block tiny Llama (built from a config) is quantized at 2 bits; some of its layers are then
served as BCQLinear, so both quantized layer kinds are in the graph.  Batches of 5 and 40
tokens exercise both kernel paths (straight from the packed codes up to SMALL_BATCH_MAX rows,
dequantize + GEMM above).
"""
import copy

import pytest
import torch

import decoupleq
from decoupleq.bcq import bcq_from_uniform
from decoupleq.config import QuantConfig
from decoupleq.nn import SMALL_BATCH_MAX, QuantLinear
from decoupleq.nn_bcq import BCQLinear

from _pipeline_models import one_thread, tiny_llama, token_batches

torch_ops = pytest.importorskip("decoupleq.torch_ops")
if not torch_ops.AVAILABLE:
    pytest.skip("torch.library.custom_op needs torch >= 2.4", allow_module_level=True)

# Dynamo's graph names an op by its packet (torch.ops.ns.name), later stages by its overload.
OPS = {op: name for name in ("packed_linear", "bcq_linear")
       for op in (getattr(torch.ops.decoupleq, name), getattr(torch.ops.decoupleq, name).default)}
N_LAYERS = 14  # 7 linear layers in each of the 2 blocks
N_BCQ = 2  # the MLP down projections


def _as_bcq(q: QuantLinear) -> BCQLinear:
    """The same weight as a BCQLinear (levels equal to the uniform ones up to rounding)."""
    w = bcq_from_uniform(q.codes.numpy(), q.scale.detach().numpy(), q.zero.detach().numpy(), q.bits,
                         q.group_size)
    shell = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    return BCQLinear.from_bcq(shell, w, method="rtn")


@pytest.fixture(scope="module")
def models():
    """(the float model, its W2 g32 RTN quantization with two layers as BCQLinear)."""
    with one_thread():
        float_model = tiny_llama(seed=3, layers=2)
        model = copy.deepcopy(float_model)
        decoupleq.quantize(model, token_batches(n=4, seq=16, seed=1), QuantConfig(method="rtn", bits=2,
                                                                                   group_size=32),
                           blockwise=False, verbose=False)
        for block in model.model.layers:
            block.mlp.down_proj = _as_bcq(block.mlp.down_proj)
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(QuantLinear) == N_LAYERS - N_BCQ and kinds.count(BCQLinear) == N_BCQ
    return float_model, model


@pytest.fixture(scope="module")
def quantized(models):
    return models[1]


def _ids(tokens):
    return token_batches(n=1, seq=tokens, seed=tokens)


def _counting_backend(seen, graphs):
    """A Dynamo backend that records the graphs it gets and how often each decoupleq op is in them."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in OPS:
                seen[OPS[node.target]] = seen.get(OPS[node.target], 0) + 1
        return gm.forward
    return backend


@pytest.mark.parametrize("tokens", [5, 40])
def test_one_graph_with_every_layer_as_an_op_and_eager_logits_exactly(quantized, tokens):
    assert (tokens > SMALL_BATCH_MAX) == (tokens == 40)
    ids = _ids(tokens)
    torch._dynamo.reset()
    with one_thread(), torch.no_grad():
        eager = quantized(ids).logits
        seen, graphs = {}, []
        # fullgraph=True: any graph break is an error, so one graph holds the whole forward.
        compiled = torch.compile(quantized, backend=_counting_backend(seen, graphs), fullgraph=True)
        got = compiled(ids).logits
    assert len(graphs) == 1
    assert seen == {"packed_linear": N_LAYERS - N_BCQ, "bcq_linear": N_BCQ}
    # The captured graph runs the same torch ops and the same kernel calls as eager: bit for bit.
    assert torch.equal(got, eager)


def test_inductor_fullgraph_matches_eager(models):
    float_model, quantized = models
    ids = _ids(40)
    torch._dynamo.reset()
    with one_thread(), torch.no_grad():
        eager = quantized(ids).logits
        compiled = torch.compile(quantized, fullgraph=True)  # inductor, the default backend
        got = compiled(ids).logits
        full_precision = float_model(ids).logits
    # The decoupleq ops compute exactly what eager does; inductor's generated code for the
    # rest (RMSNorm, rotary, softmax, residual adds fused into loops) sums and rounds in
    # another order, so float32 rounding differences of ~1e-6 relative, accumulated over two
    # blocks, are expected: 1e-4 on logits of magnitude ~1 is two orders above them and
    # far below the difference 2-bit quantization makes (checked below), which a wrong or
    # skipped kernel would show.
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    assert (got - eager).abs().max() < 1e-3 * (eager - full_precision).abs().max()


def test_sft_autograd_path_unaffected_by_compiling(quantized):
    # Compiling for inference does not change the training path: eager SFT gradients of a
    # model that was compiled equal those of a copy that never was.
    model = copy.deepcopy(quantized)
    fresh = copy.deepcopy(quantized)
    ids = _ids(12)
    torch._dynamo.reset()
    with one_thread():
        with torch.no_grad():
            torch.compile(model, backend="aot_eager", fullgraph=True)(ids)
        grads = []
        for m in (model, fresh):
            params = decoupleq.prepare_for_sft(m)
            m(input_ids=ids, labels=ids).loss.backward()
            grads.append([p.grad.clone() for p in params])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert any(a.abs().sum() > 0 for a in grads[0])


def test_op_fake_gives_the_shape_and_eager_dispatch_gives_the_layer_output(quantized):
    # The fake (meta) implementation: shapes and dtype only, no kernel run.
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = quantized.model.layers[0].self_attn.q_proj
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(7, layer.in_features)
        y = torch.ops.decoupleq.packed_linear(x, layer.packed, layer.scale, layer.zero, None, layer.bits,
                                              layer.in_features, layer.group_size)
    assert tuple(y.shape) == (7, layer.out_features) and y.dtype == torch.float32
    # Called eagerly through the dispatcher, the op gives the layer's own output.
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        b = None if layer.bias is None else layer.bias.float()
        y = torch.ops.decoupleq.packed_linear(x, layer.packed, layer.scale, layer.zero, b, layer.bits,
                                              layer.in_features, layer.group_size)
        assert torch.equal(y, layer(x))
