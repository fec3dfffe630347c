"""The ``quantize`` pass: placement, scales, lint of the Q/DQ it writes, cache, sensitivity, deployment check."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.calibration import open_calibration
from onnxopt.errors import PreconditionError
from onnxopt.pass_base import PassContext
from onnxopt.pass_manager import PassManager
from onnxopt.registry import load_registry
from onnxopt.validate import output_metrics, random_inputs, run, session

REG = load_registry()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "models", "digits_resnet.onnx")
DIGITS_NPZ = os.path.join(ROOT, "models", "digits.npz")


# -- tiny graphs -------------------------------------------------------------------------------------------------------

def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "t", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_chain(n_convs=2, bias=True, opset=17) -> onnx.ModelProto:
    """x[N,3,8,8] -> conv1 -> relu1 -> conv2 [-> relu2 -> conv3] -> y."""
    rng = np.random.default_rng(0)
    nodes, inits, cin, t = [], {}, 3, "x"
    for i in range(1, n_convs + 1):
        cout = 4 + i
        inits[f"w{i}"] = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        ins = [t, f"w{i}"]
        if bias and i == 1:
            inits["b1"] = rng.normal(0, 0.1, cout).astype(np.float32)
            ins.append("b1")
        out = "y" if i == n_convs else f"c{i}"
        nodes.append(helper.make_node("Conv", ins, [out], name=f"conv{i}", pads=[1, 1, 1, 1]))
        if i < n_convs:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            t = f"r{i}"
        cin = cout
    return _model(nodes, [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", cin, 8, 8])], inits, opset)


def residual_block() -> onnx.ModelProto:
    """x -> conv0 -> relu0 (a) -> conv1 -> relu1 -> conv2 -> add(conv2, a) -> relu -> y."""
    rng = np.random.default_rng(1)
    w = {f"w{i}": (rng.standard_normal((4, 4 if i else 3, 3, 3)) / 6).astype(np.float32) for i in range(3)}
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["a"], name="relu0"),
        helper.make_node("Conv", ["a", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "a"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="relu_out"),
    ]
    return _model(nodes, [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 4, 8, 8])], w)


def concat_pool() -> onnx.ModelProto:
    """convA -> ra, convB -> rb; concat(ra, rb) -> maxpool -> convC -> y1; ra -> convD -> y2."""
    rng = np.random.default_rng(2)
    w = {"wa": rng.standard_normal((4, 3, 1, 1)).astype(np.float32),
         "wb": (3 * rng.standard_normal((4, 3, 1, 1))).astype(np.float32),
         "wc": rng.standard_normal((2, 8, 1, 1)).astype(np.float32),
         "wd": rng.standard_normal((2, 4, 1, 1)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["ca"], name="convA"),
        helper.make_node("Relu", ["ca"], ["ra"], name="reluA"),
        helper.make_node("Conv", ["x", "wb"], ["cb"], name="convB"),
        helper.make_node("Relu", ["cb"], ["rb"], name="reluB"),
        helper.make_node("Concat", ["ra", "rb"], ["cat"], name="cat", axis=1),
        helper.make_node("MaxPool", ["cat"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "wc"], ["y1"], name="convC"),
        helper.make_node("Conv", ["ra", "wd"], ["y2"], name="convD"),
    ]
    return _model(nodes, [_vi("x", ["N", 3, 8, 8])], [_vi("y1", ["N", 2, 4, 4]), _vi("y2", ["N", 2, 8, 8])], w)


def dense_model() -> onnx.ModelProto:
    """x[N,6] -> Gemm(transB, bias) -> relu -> MatMul(B[5,4]) -> y."""
    rng = np.random.default_rng(3)
    w = {"wg": rng.standard_normal((5, 6)).astype(np.float32), "bg": rng.standard_normal(5).astype(np.float32),
         "wm": rng.standard_normal((5, 4)).astype(np.float32)}
    nodes = [
        helper.make_node("Gemm", ["x", "wg", "bg"], ["g"], name="gemm", transB=1),
        helper.make_node("Relu", ["g"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "wm"], ["y"], name="matmul"),
    ]
    return _model(nodes, [_vi("x", ["N", 6])], [_vi("y", ["N", 4])], w)


def conv_transpose_model() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    w = {"wt": rng.standard_normal((4, 3, 2, 2)).astype(np.float32)}
    nodes = [helper.make_node("ConvTranspose", ["x", "wt"], ["y"], name="up", strides=[2, 2])]
    return _model(nodes, [_vi("x", ["N", 4, 4, 4])], [_vi("y", ["N", 3, 8, 8])], w)


def _ctx(model, samples=32, seed=0, **kw) -> PassContext:
    shapes = {}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            shapes[vi.name] = (8, *[d.dim_value for d in dims[1:]])
    src = open_calibration(None, model=model, random=True, samples=samples, batch_size=8, seed=seed,
                           input_shapes=shapes)
    return PassContext(calibration=src, seed=seed, **kw)


def quantize(model, ctx=None, cls=None, **opts):
    opts.setdefault("check", False)
    p = (cls or REG.get("quantize"))(**opts)
    ctx = ctx or _ctx(model)
    q, rec = PassManager([p]).run(model, ctx)
    return q, rec.passes[0], ctx


def ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def inits(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def producer_of(model, name):
    return next((n for n in model.graph.node if name in n.output), None)


def consumers_of(model, name):
    return [n for n in model.graph.node if name in n.input]


def feeds_for(model, n=8, seed=5):
    return random_inputs(model, {model.graph.input[0].name: (n, *[d.dim_value for d in
                                                                   model.graph.input[0].type.tensor_type.shape.dim[1:]])},
                         seed=seed)


def lint(model: onnx.ModelProto, target: str = "tensorrt") -> int:
    """Every Q/DQ: constant scales > 0, zero point 0 and int8 (tensorrt), per-channel scales one per channel of the
    stated axis (weights only), opset >= 13, no graph output produced by Q/DQ. Returns the number of Q/DQ nodes."""
    opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    assert opset >= 13
    consts = inits(model)
    outputs = {o.name for o in model.graph.output}
    n = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        n += 1
        assert not set(node.output) & outputs, f"{node.name} produces a graph output"
        scale = consts[node.input[1]]
        assert np.all(scale > 0) and np.all(np.isfinite(scale))
        zp = consts[node.input[2]]
        if target == "tensorrt":
            assert zp.dtype == np.int8 and not np.any(zp), f"{node.name}: zero point must be int8 0"
        assert zp.shape == scale.shape
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1:
            assert node.op_type == "DequantizeLinear" and node.input[0] in consts, "per-channel only on weights"
            w = consts[node.input[0]]
            assert scale.size == w.shape[axis], f"{node.name}: {scale.size} scales for dim {w.shape[axis]}"
            assert w.dtype in (np.int8, np.int32)
        else:
            assert scale.ndim == 0
    return n


# -- placement ---------------------------------------------------------------------------------------------------------

def test_tensorrt_placement_on_a_conv_chain():
    m = conv_chain()
    q, rec, _ = quantize(m)
    assert rec.changed
    assert ops(q) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv", "Relu",
                      "QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv"]
    assert rec.stats["quantized_nodes"] == 2 and rec.stats["qdq_activations"] == 2
    assert rec.stats["int8_weights"] == 2 and rec.stats["float_biases"] == 1 and rec.stats["int32_biases"] == 0
    assert rec.stats["calib_samples"] == 32 and rec.stats["calib_random"] == 1
    conv1, conv2 = [n for n in q.graph.node if n.op_type == "Conv"]
    assert conv1.input[2] == "b1"  # bias stays float for TensorRT
    assert producer_of(q, conv1.input[0]).op_type == "DequantizeLinear"
    assert producer_of(q, conv2.input[0]).op_type == "DequantizeLinear"
    assert producer_of(q, "y").op_type == "Conv"  # the graph output is not quantized
    assert producer_of(q, conv1.input[1]).op_type == "DequantizeLinear"
    assert lint(q) == 6
    # int8 weights: the model loses its float weights
    assert "w1" not in inits(q) and inits(q)["w1_int8"].dtype == np.int8
    assert len(q.SerializeToString()) < 0.5 * len(m.SerializeToString()) + 1500
    # numerics (ORT, optimizations off) on data like the calibration data
    feeds = feeds_for(m)
    ref, new = run(session(m), feeds), run(session(q), feeds)
    met = output_metrics("y", ref["y"], new["y"])
    assert met.cosine > 0.999 and met.sqnr_db > 25


def test_onnxruntime_placement_quantizes_outputs_and_int32_bias():
    m = conv_chain()
    q, rec, _ = quantize(m, target="onnxruntime")
    conv1, conv2 = [n for n in q.graph.node if n.op_type == "Conv"]
    bias_dq = producer_of(q, conv1.input[2])
    assert bias_dq.op_type == "DequantizeLinear" and inits(q)[bias_dq.input[0]].dtype == np.int32
    consts = inits(q)
    # bias scale = activation scale * weight scales
    x_q = producer_of(q, producer_of(q, conv1.input[0]).input[0])
    w_dq = producer_of(q, conv1.input[1])
    np.testing.assert_allclose(consts[bias_dq.input[1]], consts[x_q.input[1]] * consts[w_dq.input[1]], rtol=1e-6)
    # uint8 activations: x is two-sided (zero point near 128), relu1's output one-sided (zero point 0)
    assert consts[x_q.input[2]].dtype == np.uint8 and 120 <= int(consts[x_q.input[2]]) <= 136
    r_q = producer_of(q, producer_of(q, conv2.input[0]).input[0])
    assert r_q.input[0] == "r1" and int(consts[r_q.input[2]]) == 0
    assert producer_of(q, "y").op_type == "Conv" and rec.stats["int32_biases"] == 1
    lint(q, "onnxruntime")
    feeds = feeds_for(m)
    met = output_metrics("y", run(session(m), feeds)["y"], run(session(q, optimize=True), feeds)["y"])
    assert met.cosine > 0.999


def test_residual_add_gets_qdq_on_its_residual_input():
    m = residual_block()
    q, rec, _ = quantize(m)
    add = next(n for n in q.graph.node if n.op_type == "Add")
    p0, p1 = producer_of(q, add.input[0]), producer_of(q, add.input[1])
    assert p0.op_type == "Conv" and p0.name == "conv2"  # the conv that fuses with the add: no Q/DQ in between
    assert p1.op_type == "DequantizeLinear"  # the residual input
    assert producer_of(q, p1.input[0]).input[0] == "a"
    conv1 = next(n for n in q.graph.node if n.name == "conv1")
    assert conv1.input[0] == add.input[1]  # one Q/DQ pair for "a", shared by conv1 and the add
    assert rec.stats["quantized_nodes"] == 4 and rec.stats["qdq_activations"] == 3
    relu0 = next(n for n in q.graph.node if n.name == "relu0")
    assert producer_of(q, relu0.input[0]).op_type == "Conv"  # nothing between a conv and its activation
    lint(q)


def test_concat_and_maxpool_share_one_scale():
    m = concat_pool()
    q, rec, ctx = quantize(m)
    consts = inits(q)
    scale_of = {}
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear":
            scale_of[n.input[0]] = float(consts[n.input[1]])
    assert set(scale_of) == {"x", "ra", "p"}
    assert scale_of["ra"] == scale_of["p"]  # linked through Concat and MaxPool
    assert rec.stats["shared_scale_groups"] == 1
    ranges = ctx.artifacts["quantize"]["ranges"]
    assert ranges["ra"] == ranges["p"]
    assert [sorted(g) for g in ctx.artifacts["quantize"]["shared_scale_groups"]] == [["p", "ra"]]
    # the shared range covers both tensors: p (after the larger branch rb) has the larger max
    assert scale_of["p"] * 127 == pytest.approx(max(abs(v) for v in ranges["p"]), rel=1e-6)


@pytest.mark.parametrize("builder, node, axis, channels", [
    (dense_model, "gemm", 0, 5), (dense_model, "matmul", 1, 4), (conv_transpose_model, "up", 1, 3),
])
def test_per_channel_weight_axis(builder, node, axis, channels):
    m = builder()
    q, rec, _ = quantize(m)
    n = next(x for x in q.graph.node if x.name == node)
    dq = next(producer_of(q, i) for i in n.input if producer_of(q, i) is not None
              and producer_of(q, i).op_type == "DequantizeLinear" and producer_of(q, i).input[0] in inits(q))
    assert next(a.i for a in dq.attribute if a.name == "axis") == axis
    assert inits(q)[dq.input[1]].shape == (channels,)
    lint(q)
    feeds = feeds_for(m)
    out = next(iter(run(session(m), feeds)))
    met = output_metrics(out, run(session(m), feeds)[out], run(session(q), feeds)[out])
    assert met.cosine > 0.998


def test_per_tensor_weights_when_per_channel_is_off():
    q, _, _ = quantize(conv_chain(), per_channel=False)
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear":
            assert inits(q)[n.input[1]].ndim == 0 and not any(a.name == "axis" for a in n.attribute)


def test_exclusions_by_name_op_type_and_first_last():
    m = conv_chain(3)
    q, rec, _ = quantize(m, exclude=("conv2",))
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    assert conv2.input[0] == "r1" and conv2.input[1] == "w2"  # float input and float weight
    assert rec.stats["skipped_excluded"] == 1 and rec.stats["quantized_nodes"] == 2
    q, rec, _ = quantize(m, skip_first_last=True)
    quantized = {n.name for n in q.graph.node if n.op_type == "Conv"
                 and producer_of(q, n.input[1]) is not None}
    assert quantized == {"conv2"} and rec.stats["skipped_first_last"] == 2
    q, rec, _ = quantize(m, exclude=("Conv",))
    assert not rec.changed and rec.stats["skipped_nothing_to_quantize"] == 1 and rec.stats["skipped_excluded"] == 3
    assert ops(q) == ops(m)


def test_only_the_quantized_tensors_are_calibrated_without_a_cache(tmp_path):
    m = conv_chain(3)
    _, rec, ctx = quantize(m, exclude=("conv2",))
    ranges = ctx.artifacts["quantize"]["ranges"]
    assert rec.stats["calib_tensors"] == 2 and set(ranges) == {"x", "r2"}
    _, rec, ctx = quantize(m, exclude=("conv2",), calib_cache=str(tmp_path / "c.json"))
    assert rec.stats["calib_tensors"] == 3  # a cache holds every candidate, for later exclusions
    assert ctx.artifacts["quantize"]["ranges"] == ranges  # the same ranges either way


def test_preconditions():
    from tests.helpers import conv_bn_relu_model

    bn = conv_bn_relu_model()
    with pytest.raises(PreconditionError, match="run fold-bn first"):
        quantize(bn)
    # after fold-bn it applies
    q, rec = PassManager([REG.create("fold-bn"), REG.create("quantize", check=False)]).run(bn, _ctx(bn))
    assert rec.passes[1].changed and "BatchNormalization" not in ops(q)
    with pytest.raises(PreconditionError, match=r"needs --calib DATA \(or --calib-random for testing\)"):
        quantize(conv_chain(), ctx=PassContext())
    with pytest.raises(PreconditionError, match="opset >= 13"):
        quantize(conv_chain(opset=12))


def test_nothing_to_quantize_leaves_the_graph_alone():
    from tests.helpers import relu_model

    m = relu_model()
    q, rec, _ = quantize(m)
    assert not rec.changed and rec.stats == {"skipped_nothing_to_quantize": 1}


# -- lint on the zoo ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, size", [("resnet18", 32), ("mobilenetv2", 32), ("yolo", 64), ("unet", 32)])
def test_zoo_models_quantize_lint_clean_and_run(name, size):
    from models.zoo import ZOO
    from onnxopt.trt_check import check

    m = ZOO[name](1, size, size, 0)
    ctx = _ctx(m, samples=2)
    q, rec = PassManager([REG.create("fold-bn"), REG.create("quantize", check=False)]).run(m, ctx)
    st = rec.passes[1].stats
    n_conv = sum(1 for n in q.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"))
    assert st["quantized_nodes"] >= n_conv and st["int8_weights"] == n_conv
    assert lint(q) >= 2 * n_conv
    assert not [f for f in check(q) if f.code.startswith("QDQ_")]
    feeds = random_inputs(m, seed=1)
    ref, new = run(session(m), feeds), run(session(q, optimize=True), feeds)
    assert all(np.isfinite(v).all() and v.shape == ref[k].shape for k, v in new.items())


# -- cache -------------------------------------------------------------------------------------------------------------

def test_calibration_cache_reuse_and_stale_refusal(tmp_path):
    m = residual_block()
    cache = str(tmp_path / "calib.json")
    q1, rec1, _ = quantize(m, calib_cache=cache)
    assert rec1.stats["calib_cache"] == "written"
    doc = json.loads(open(cache).read())
    assert set(doc["tensors"]) == {"x", "a", "r1"} and len(doc["model_sha256"]) == 64
    # a rerun with other exclusions needs no calibration data at all
    q2, rec2, _ = quantize(m, ctx=PassContext(), calib_cache=cache, exclude=("conv2",))
    assert rec2.stats["calib_cache"] == "reused" and "calib_samples" not in rec2.stats
    s1 = {n.input[0]: float(inits(q1)[n.input[1]]) for n in q1.graph.node if n.op_type == "QuantizeLinear"}
    s2 = {n.input[0]: float(inits(q2)[n.input[1]]) for n in q2.graph.node if n.op_type == "QuantizeLinear"}
    assert s2 == {k: s1[k] for k in s2} and "r1" not in s2
    # another model: refused, not silently used
    other = residual_block()
    w = numpy_helper.to_array(other.graph.initializer[0]) * 1.01
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array(w.astype(np.float32), other.graph.initializer[0].name))
    with pytest.raises(PreconditionError, match="is stale: it was made for another model"):
        quantize(other, calib_cache=cache)
    # other calibration data: refused too
    with pytest.raises(PreconditionError, match="made with other calibration data"):
        quantize(m, ctx=_ctx(m, samples=16), calib_cache=cache)


# -- plots -------------------------------------------------------------------------------------------------------------

def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    q, rec, _ = quantize(conv_chain(), plot_dir=str(tmp_path / "plots"))
    files = sorted(os.listdir(tmp_path / "plots"))
    assert files == ["act_r1.png", "act_x.png", "weight_w1.png", "weight_w2.png"] and rec.stats["plots"] == 4
    assert all((tmp_path / "plots" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


# -- sensitivity -------------------------------------------------------------------------------------------------------

def test_sensitivity_keeps_the_sensitive_layer_in_float():
    """One Gemm weight with a huge outlier on an input that is always 0: harmless in float, but per-tensor int8
    rounds that layer's other weights to zero."""
    rng = np.random.default_rng(6)
    w1 = rng.standard_normal((8, 8)).astype(np.float32)
    w1[7] = 0.0  # feature 7 of the first layer's output is always 0
    w2 = rng.standard_normal((8, 8)).astype(np.float32)
    w2[0, 7] = 2000.0
    w3 = rng.standard_normal((4, 8)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["a"], name="g1", transB=1),
             helper.make_node("Relu", ["a"], ["ra"], name="r1"),
             helper.make_node("Gemm", ["ra", "w2"], ["b"], name="g2_bad", transB=1),
             helper.make_node("Relu", ["b"], ["rb"], name="r2"),
             helper.make_node("Gemm", ["rb", "w3"], ["y"], name="g3", transB=1)]
    m = _model(nodes, [_vi("x", ["N", 8])], [_vi("y", ["N", 4])], {"w1": w1, "w2": w2, "w3": w3})
    q, rec, ctx = quantize(m, per_channel=False, sensitivity=True, target_cosine=0.999)
    sens = ctx.artifacts["quantize"]["sensitivity"]
    assert list(sens["per_layer"])[0] == "g2_bad"
    assert rec.stats["fallback_layers"] == "g2_bad" and sens["target_met"]
    g2 = next(n for n in q.graph.node if n.name == "g2_bad")
    assert g2.input[1] == "w2"  # kept in float
    feeds = feeds_for(m, n=32)
    met = output_metrics("y", run(session(m), feeds)["y"], run(session(q), feeds)["y"])
    assert met.cosine >= 0.999
    # without the fallback the target fails
    q0, _, _ = quantize(m, per_channel=False)
    assert output_metrics("y", run(session(m), feeds)["y"], run(session(q0), feeds)["y"]).cosine < 0.999


# -- validation where it deploys -------------------------------------------------------------------------------------

def _saturating_u8s8_conv(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Emulates x86 CPUs without VNNI running ONNX Runtime's u8 x s8 conv kernel (vpmaddubsw): pairs of products
    along the reduction axis are summed with int16 saturation. Handles the one-conv model of the test below."""
    c = inits(model)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    xq = producer_of(model, producer_of(model, conv.input[0]).input[0])
    wdq, bdq = producer_of(model, conv.input[1]), producer_of(model, conv.input[2])
    sx, zx = float(c[xq.input[1]]), int(c[xq.input[2]])
    w, sw, b = c[wdq.input[0]].astype(np.int64), c[wdq.input[1]], c[bdq.input[0]].astype(np.int64)
    x = feeds[xq.input[0]]
    xu = np.clip(np.round(x / sx) + zx, 0, 255).astype(np.int64)
    xp = np.pad(xu, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=zx)
    n, cin, h, wd = x.shape
    cols = np.stack([xp[:, :, i:i + h, j:j + wd] for i in range(3) for j in range(3)], axis=2)  # N,C,9,H,W
    cols = cols.reshape(n, cin * 9, h, wd)
    wf = w.reshape(w.shape[0], cin * 9)
    prod = cols[:, None] * wf[None, :, :, None, None]  # N,O,K,H,W
    pairs = prod[:, :, 0::2] + np.pad(prod[:, :, 1::2], ((0, 0), (0, 0), (0, prod.shape[2] % 2), (0, 0), (0, 0)))
    acc = np.clip(pairs, -32768, 32767).sum(axis=2)
    acc = acc - zx * wf.sum(axis=1)[None, :, None, None] + b[None, :, None, None]
    return {"y": (acc * (sx * sw)[None, :, None, None]).astype(np.float32)}


def test_deployment_check_detects_saturation_and_fixes_it_with_7bit_weights(tmp_path):
    from onnxopt.passes.quantize import Quantize

    class OnAvx2WithoutVnni(Quantize):
        name = "quantize"

        def _run_deployed(self, model, feeds, batch):
            return _saturating_u8s8_conv(model, feeds)

    rng = np.random.default_rng(7)
    w = rng.uniform(-1, 1, (6, 8, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, 6).astype(np.float32)
    m = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
               [_vi("x", ["N", 8, 6, 6])], [_vi("y", ["N", 6, 6, 6])], {"w": w, "b": b})
    x = rng.uniform(0, 1, (64, 8, 6, 6)).astype(np.float32)  # non-negative activations, as after a ReLU
    np.savez(tmp_path / "calib.npz", x=x)

    def ctx():
        return PassContext(calibration=open_calibration(tmp_path / "calib.npz", model=m))

    q, rec, c = quantize(m, ctx=ctx(), cls=OnAvx2WithoutVnni, target="onnxruntime", check=True)
    extra = c.artifacts["validation_extra"]
    check = c.artifacts["quantize"]["check"]
    assert check["first"]["weight_bits"] == 8 and check["first"]["disagreement"]
    assert rec.stats["weight_bits"] == 7 and "fixed with 7-bit weights" in extra["int8 deployment check"]
    assert np.abs(inits(q)["w_int8"]).max() == 63
    assert check["deployment"]["cosine"]["y"] > 0.999
    # the emulation is faithful where nothing saturates: 7-bit results equal ORT's reference semantics
    ref = run(session(q), {"x": x[:8]})["y"]
    np.testing.assert_allclose(_saturating_u8s8_conv(q, {"x": x[:8]})["y"], ref, rtol=1e-4, atol=1e-4)
    # TensorRT target: reported, not "fixed" (ONNX Runtime is not its runtime)
    q, rec, c = quantize(m, ctx=ctx(), cls=OnAvx2WithoutVnni, target="onnxruntime", check=True, reduce_range="off")
    assert rec.stats["weight_bits"] == 8 and "DISAGREES" in c.artifacts["validation_extra"]["int8 deployment check"]
    # on this machine's real kernels the same model agrees in both modes with 8-bit weights
    q, rec, c = quantize(m, ctx=ctx(), target="onnxruntime", check=True)
    assert rec.stats["weight_bits"] == 8
    assert c.artifacts["validation_extra"]["int8 deployment check"] == "deployment agrees with the reference"


# -- done when: the digits model end to end --------------------------------------------------------------------------

def test_digits_entropy_end_to_end(tmp_path):
    """onnxopt run digits -p fold-bn -p quantize:method=entropy --calib digits.npz: deployment accuracy >= FP32 - 0.3
    points on the held-out test split, file <= 0.3x."""
    from onnxopt.cli import main

    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        main(["run", DIGITS, "-p", "fold-bn", "-p", "quantize:method=entropy", "--calib", DIGITS_NPZ,
              "-o", str(out), "--json", str(rep), "-q"])
    assert e.value.code == 0
    assert os.path.getsize(out) <= 0.3 * os.path.getsize(DIGITS)
    d = np.load(DIGITS_NPZ)
    x, y = d["test_input"], d["test_labels"]
    acc_float = np.mean(run(session(DIGITS), {"input": x})["logits"].argmax(1) == y)
    acc_deploy = np.mean(run(session(str(out), optimize=True), {"input": x})["logits"].argmax(1) == y)
    assert acc_deploy >= acc_float - 0.003
    extra = json.loads(rep.read_text())["validation"]["extra"]
    assert extra["int8 deployment check"] == "deployment agrees with the reference"
    assert extra["float accuracy"] == f"{100 * acc_float:.2f}%"
    assert f"accuracy {100 * acc_deploy:.2f}%" in extra["int8 deployment (ORT_ENABLE_ALL)"]


def test_cli_quantize_eval_prints_both_modes(tmp_path, capsys):
    from onnxopt.cli import main

    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        main(["quantize", DIGITS, "--calib", DIGITS_NPZ, "--calib-samples", "64", "--target", "onnxruntime",
              "--method", "mse", "--eval", DIGITS_NPZ, "-o", str(out), "--json", str(rep), "-q"])
    assert e.value.code == 0
    acc = json.loads(rep.read_text())["eval_accuracy"]
    assert set(acc) == {"float, ORT optimizations off", "float, ORT_ENABLE_ALL",
                        "int8, ORT optimizations off (reference)", "int8, ORT_ENABLE_ALL (deployment)"}
    assert acc["int8, ORT_ENABLE_ALL (deployment)"] >= acc["float, ORT optimizations off"] - 0.01
    assert "int8, ORT_ENABLE_ALL (deployment)" in capsys.readouterr().out
    # bad input: one line, exit 2, nothing written
    with pytest.raises(SystemExit) as e:
        main(["quantize", DIGITS, "--calib", DIGITS_NPZ, "--eval", str(tmp_path / "nope.npz"),
              "-o", str(tmp_path / "x.onnx")])
    assert e.value.code == 2 and not (tmp_path / "x.onnx").exists()
    assert "--eval" in capsys.readouterr().err
    # random calibration is flagged in the report
    with pytest.raises(SystemExit) as e:
        main(["run", DIGITS, "-p", "fold-bn", "-p", "quantize:check=false", "--calib-random", "--calib-samples", "8",
              "--input-shape", "input=8x1x32x32", "-o", str(tmp_path / "r.onnx"), "--json", str(rep), "-q"])
    assert e.value.code == 0
    assert any("RANDOM" in n for n in json.loads(rep.read_text())["notes"])
