"""Tests of the ``fold-bn`` pass: every fold variant with ONNX Runtime numerics, and every reason a BN is left."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.graphutil import fingerprint
from onnxopt.model import graph_to_model, header_of
from onnxopt.pass_base import PassContext
from onnxopt.pass_manager import PassManager
from onnxopt.passes.fold_bn import FoldBatchNorm
from onnxopt.validate import output_metrics, run
from tests.helpers import init, make_model, vi

ROOT = Path(__file__).resolve().parents[2]
F32 = TensorProto.FLOAT
RTOL = ATOL = 1e-5


# -- builders -------------------------------------------------------------------------------------------------------

def weight(rng, shape, fan_in):
    """Normal weights scaled by 1/sqrt(fan_in), so activations stay O(1) and float32 rounding stays ~1e-7."""
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def bn_arrays(rng, c, *, prefix="bn", dtype=np.float32, negative=False):
    """gamma, beta, mean, var initializers; gamma < 0 for some channels when ``negative``."""
    gamma = rng.uniform(0.5, 1.5, c)
    if negative:
        gamma[::2] *= -1
    arrays = {
        f"{prefix}_gamma": gamma,
        f"{prefix}_beta": rng.normal(0, 0.5, c),
        f"{prefix}_mean": rng.normal(0, 0.5, c),
        f"{prefix}_var": rng.uniform(0.5, 1.5, c),
    }
    return [init(k, v.astype(dtype)) for k, v in arrays.items()]


def layer_bn_params(rng, w, c, bias):
    """Initializers of a layer with weight ``w`` (and a random bias when ``bias``) followed by a BN over ``c``
    channels, and the layer's inputs: ["x", "w"] or ["x", "w", "b"]."""
    inits = [init("w", w)] + bn_arrays(rng, c)
    ins = ["x", "w"]
    if bias:
        inits.append(init("b", rng.standard_normal(c).astype(np.float32)))
        ins.append("b")
    return inits, ins


def bn_factors64(model, prefix="bn", eps=1e-5):
    """(gamma / sqrt(var + eps), beta - mean * that) in float64, from the model's BN initializers."""
    a = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    scale = a[f"{prefix}_gamma"] / np.sqrt(a[f"{prefix}_var"] + eps)
    return scale, a[f"{prefix}_beta"] - a[f"{prefix}_mean"] * scale


def bn_node(x, y, *, prefix="bn", name="bn", **attrs):
    ins = [x] + [f"{prefix}_{p}" for p in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", ins, [y], name=name, **attrs)


# -- running --------------------------------------------------------------------------------------------------------

def assert_accounted(stats):
    """Every BN is folded, rewritten or left with a reason."""
    done = sum(v for k, v in stats.items() if k != "bn_total")
    assert done == stats["bn_total"]


def fold(model, **options):
    """Run the pass directly on a graph; returns (new model, result, graph unchanged by fingerprint)."""
    graph = gs.import_onnx(model)
    before = fingerprint(graph)
    result = FoldBatchNorm(**options).run(graph, PassContext())
    unchanged = fingerprint(graph) == before
    assert_accounted(result.stats)
    new = graph_to_model(graph, header_of(model))
    onnx.checker.check_model(new)
    return new, result, unchanged


def fold_managed(model, **options):
    """Run the pass through the PassManager (contract checks: exact `changed`, checker, shape inference, topo order)."""
    new, record = PassManager([FoldBatchNorm(**options)]).run(model, PassContext())
    assert_accounted(record.passes[0].stats)
    return new, record.passes[0]


def ops(model):
    return [n.op_type for n in model.graph.node]


def feeds_for(model, seed=1):
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        tt = i.type.tensor_type
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[i.name] = rng.standard_normal([d.dim_value for d in tt.shape.dim]).astype(dt)
    return feeds


def assert_same_numerics(ref_model, new_model, *, rtol=RTOL, atol=ATOL, feeds=None):
    feeds = feeds or feeds_for(ref_model)
    ref, new = run(ref_model, feeds), run(new_model, feeds)
    assert list(ref) == list(new)
    for k in ref:
        assert ref[k].shape == new[k].shape and ref[k].dtype == new[k].dtype
        np.testing.assert_allclose(new[k], ref[k], rtol=rtol, atol=atol, err_msg=k)


def initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_unchanged(model, **options):
    """The pass leaves the graph alone; returns the stats for the caller to check the reason."""
    new, result, unchanged = fold(model, **options)
    assert result.changed is False and unchanged
    assert [(n.op_type, list(n.input), list(n.output)) for n in new.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in model.graph.node
    ]
    a, b = initializers(model), initializers(new)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # and through the manager: its fingerprint agrees that nothing changed
    _, rec = fold_managed(model, **options)
    assert rec.changed is False and rec.stats == result.stats
    return result.stats


# -- backward: Conv -------------------------------------------------------------------------------------------------

def conv_bn_model(rng, *, dims=2, group=1, dilation=1, bias=True, cin=4, cout=6, opset=17, tail="Relu",
                  bn_attrs=None, stride=1):
    spatial = [7, 6, 5][:dims]
    w = weight(rng, (cout, cin // group) + (3,) * dims, cin // group * 3**dims)
    inits, conv_in = layer_bn_params(rng, w, cout, bias)
    nodes = [
        helper.make_node("Conv", conv_in, ["c"], name="conv", group=group, dilations=[dilation] * dims,
                         pads=[1] * 2 * dims, strides=[stride] * dims),
        bn_node("c", "t" if tail else "y", **(bn_attrs or {})),
    ]
    if tail:
        nodes.append(helper.make_node(tail, ["t"], ["y"], name="tail"))
    return make_model(nodes, [vi("x", [2, cin] + spatial)], [vi("y", None)], inits, opset=opset)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2, "depthwise"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dilation", [1, 2])
def test_conv(dims, group, bias, dilation):
    rng = np.random.default_rng(dims * 100 + dilation * 10 + bias)
    if group == "depthwise":
        kw = dict(group=4, cin=4, cout=4)
    else:
        kw = dict(group=group, cin=4, cout=6)
    model = conv_bn_model(rng, dims=dims, bias=bias, dilation=dilation, **kw)
    new, result, _ = fold(model)
    assert result.changed is True
    assert result.stats == {"bn_total": 1, "folded_into_conv": 1}
    assert ops(new) == ["Conv", "Relu"]
    conv = new.graph.node[0]
    assert list(conv.output) == ["t"]  # the BN's output name lives on
    assert len(conv.input) == 3  # a bias was added when there was none
    scale, shift = bn_factors64(model)
    w64 = initializers(model)["w"].astype(np.float64)
    b64 = initializers(model)["b"].astype(np.float64) if bias else 0.0
    got = initializers(new)
    assert np.array_equal(got[conv.input[1]], (w64 * scale.reshape((-1,) + (1,) * (dims + 1))).astype(np.float32))
    assert np.array_equal(got[conv.input[2]], (b64 * scale + shift).astype(np.float32))
    assert_same_numerics(model, new)


@pytest.mark.parametrize("opset,attrs", [
    (7, {"spatial": 1, "momentum": 0.9}),
    (9, {"momentum": 0.9}),
    (14, {"training_mode": 0}),
    (15, {}),
    (17, {"epsilon": 1e-2}),
])
def test_conv_bn_opset_versions(opset, attrs):
    rng = np.random.default_rng(opset)
    model = conv_bn_model(rng, opset=opset, bn_attrs=dict(attrs, epsilon=attrs.get("epsilon", 1e-3)))
    new, rec = fold_managed(model)
    assert rec.changed is True and rec.stats == {"bn_total": 1, "folded_into_conv": 1}
    assert ops(new) == ["Conv", "Relu"]
    assert_same_numerics(model, new)


def test_opset7_spatial0_on_2d_input_folds():
    """Opset 7 ``spatial=0`` (per-activation statistics) is per-channel on an [N, C] input."""
    rng = np.random.default_rng(30)
    inits = [init("w", weight(rng, (5, 4), 5)), init("c", rng.standard_normal(4).astype(np.float32))]
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="gemm"), bn_node("g", "y", spatial=0)]
    model = make_model(nodes, [vi("x", [3, 5])], [vi("y", [3, 4])], inits + bn_arrays(rng, 4), opset=7)
    new, rec = fold_managed(model)
    assert rec.stats == {"bn_total": 1, "folded_into_gemm": 1}
    assert ops(new) == ["Gemm"]
    assert_same_numerics(model, new)


def test_opset7_spatial0_per_activation_params_are_kept():
    rng = np.random.default_rng(31)
    model = conv_bn_model(rng, tail=None, opset=7, bn_attrs={"spatial": 0})
    inits = [t for t in model.graph.initializer if not t.name.startswith("bn_")]
    inits += [init(f"bn_{p}", rng.uniform(0.5, 1.5, (6, 7, 6)).astype(np.float32))
              for p in ("gamma", "beta", "mean", "var")]
    model = make_model(list(model.graph.node), list(model.graph.input), list(model.graph.output), inits, opset=7)
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_non_per_channel_params": 1}


def test_present_optional_outputs_mean_training_even_unused():
    """Opset 9: a BN with its 5 outputs is in training mode (ONNX Runtime uses batch statistics), used or not."""
    rng = np.random.default_rng(32)
    model = conv_bn_model(rng, tail=None, opset=9)
    nodes = list(model.graph.node)
    bn = helper.make_node("BatchNormalization", list(nodes[1].input), ["y", "rm", "rv", "sm", "sv"], name="bn")
    model = make_model([nodes[0], bn], list(model.graph.input), list(model.graph.output),
                       list(model.graph.initializer), opset=9)
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_training_mode": 1}


def test_epsilon_is_respected():
    """A large epsilon changes the result noticeably; folding must use it (default 1e-5 would not match)."""
    rng = np.random.default_rng(3)
    model = conv_bn_model(rng, bn_attrs={"epsilon": 0.5})
    new, _, _ = fold(model)
    assert_same_numerics(model, new)


def test_bn_output_is_graph_output_folds_backward():
    rng = np.random.default_rng(4)
    model = conv_bn_model(rng, tail=None)
    model = make_model(list(model.graph.node), list(model.graph.input), [vi("y", [2, 6, 7, 6])],
                       list(model.graph.initializer))
    new, rec = fold_managed(model)
    assert rec.stats == {"bn_total": 1, "folded_into_conv": 1}
    assert ops(new) == ["Conv"]
    assert list(new.graph.node[0].output) == ["y"]
    assert [(o.name, o.type) for o in new.graph.output] == [(o.name, o.type) for o in model.graph.output]
    assert_same_numerics(model, new)


def test_two_bns_in_a_row_fold_into_one_conv():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    inits = [init("w", w)] + bn_arrays(rng, 3, prefix="a") + bn_arrays(rng, 3, prefix="b")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        bn_node("c", "t", prefix="a", name="bn_a"),
        bn_node("t", "y", prefix="b", name="bn_b"),
    ]
    model = make_model(nodes, [vi("x", [1, 2, 6, 6])], [vi("y", [1, 3, 4, 4])], inits)
    new, rec = fold_managed(model)
    assert rec.stats == {"bn_total": 2, "folded_into_conv": 2}
    assert ops(new) == ["Conv"]
    assert_same_numerics(model, new)


# -- backward: ConvTranspose ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride,output_padding", [(1, 0), (2, 1)])
def test_conv_transpose(group, bias, stride, output_padding):
    rng = np.random.default_rng(group * 10 + bias + stride)
    cin, cout = 4, 6
    w = weight(rng, (cin, cout // group, 3, 3), cin // group * 9)
    inits, ins = layer_bn_params(rng, w, cout, bias)
    nodes = [
        helper.make_node("ConvTranspose", ins, ["c"], name="deconv", group=group, strides=[stride, stride],
                         pads=[1, 1, 1, 1], output_padding=[output_padding] * 2),
        bn_node("c", "y"),
    ]
    model = make_model(nodes, [vi("x", [2, cin, 5, 4])], [vi("y", None)], inits)
    new, rec = fold_managed(model)
    assert rec.changed is True and rec.stats == {"bn_total": 1, "folded_into_conv_transpose": 1}
    assert ops(new) == ["ConvTranspose"]
    assert_same_numerics(model, new)


# -- backward: Gemm and MatMul --------------------------------------------------------------------------------------

@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_kind", ["none", "vector", "matrix", "scalar"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
def test_gemm(trans_b, c_kind, alpha, beta):
    rng = np.random.default_rng(trans_b * 10 + len(c_kind))
    m, k, n = 3, 5, 4
    w = weight(rng, (n, k) if trans_b else (k, n), k)
    inits = [init("w", w)] + bn_arrays(rng, n)
    ins = ["x", "w"]
    if c_kind != "none":
        shape = {"vector": (n,), "matrix": (m, n), "scalar": (1,)}[c_kind]
        inits.append(init("c", rng.standard_normal(shape).astype(np.float32)))
        ins.append("c")
    nodes = [
        helper.make_node("Gemm", ins, ["g"], name="gemm", transB=trans_b, alpha=alpha, beta=beta),
        bn_node("g", "y"),
    ]
    model = make_model(nodes, [vi("x", [m, k])], [vi("y", [m, n])], inits)
    new, rec = fold_managed(model)
    assert rec.changed is True and rec.stats == {"bn_total": 1, "folded_into_gemm": 1}
    assert ops(new) == ["Gemm"]
    assert_same_numerics(model, new)


def matmul_model(rng, *, a_shape=(3, 5), n=4, through_relu=False):
    k = a_shape[-1]
    w = weight(rng, (k, n), k)
    c = n if len(a_shape) == 2 else a_shape[1]
    nodes = []
    a = "x"
    if through_relu:  # the MatMul's input has no value_info: its rank comes from shape inference
        nodes.append(helper.make_node("Relu", ["x"], ["r"], name="relu"))
        a = "r"
    nodes += [helper.make_node("MatMul", [a, "w"], ["mm"], name="mm"), bn_node("mm", "y")]
    return make_model(nodes, [vi("x", list(a_shape))], [vi("y", None)], [init("w", w)] + bn_arrays(rng, c))


@pytest.mark.parametrize("through_relu", [False, True])
def test_matmul(through_relu):
    rng = np.random.default_rng(7)
    model = matmul_model(rng, through_relu=through_relu)
    new, rec = fold_managed(model)
    assert rec.changed is True and rec.stats == {"bn_total": 1, "folded_into_matmul": 1}
    assert ops(new) == (["Relu"] if through_relu else []) + ["Gemm"]
    assert_same_numerics(model, new)


def test_matmul_rank3_is_not_folded():
    """[B, T, K] @ [K, N]: BN normalizes axis 1 (T), not the MatMul's feature axis (N)."""
    rng = np.random.default_rng(8)
    model = matmul_model(rng, a_shape=(2, 3, 5))
    stats = assert_unchanged(model)
    assert stats == {"bn_total": 1, "skipped_matmul_not_2d": 1}


# -- Constant-node weights and float16 ------------------------------------------------------------------------------

def constant_node(name, array):
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=init(name, array))


@pytest.mark.parametrize("producer", ["Conv", "Gemm"])
def test_constant_node_weights(producer):
    """Paddle/TF style: the weight, bias and BN parameters are Constant nodes; they become initializers."""
    rng = np.random.default_rng(9)
    c = 4
    if producer == "Conv":
        w, x_shape = weight(rng, (c, 3, 3, 3), 27), [1, 3, 6, 6]
    else:
        w, x_shape = weight(rng, (5, c), 5), [2, 5]
    consts = [constant_node("w", w.astype(np.float32)), constant_node("b", rng.standard_normal(c).astype(np.float32))]
    consts += [constant_node(t.name, numpy_helper.to_array(t)) for t in bn_arrays(rng, c)]
    nodes = consts + [helper.make_node(producer, ["x", "w", "b"], ["p"], name="prod"), bn_node("p", "y")]
    model = make_model(nodes, [vi("x", x_shape)], [vi("y", None)])
    new, rec = fold_managed(model)
    assert rec.stats == {"bn_total": 1, f"folded_into_{producer.lower()}": 1}
    assert ops(new) == [producer]  # every Constant node is gone: the weights are initializers now
    assert sorted(initializers(new)) == ["b", "w"]
    assert_same_numerics(model, new)


@pytest.mark.parametrize("producer", ["Conv", "Gemm"])
def test_float16_weights_stay_float16(producer):
    rng = np.random.default_rng(10)
    c = 8
    f16 = np.float16
    if producer == "Conv":
        w, x_shape, attrs = rng.standard_normal((c, 4, 3, 3)) / 6, [2, 4, 8, 8], {"pads": [1, 1, 1, 1]}
    else:
        w, x_shape, attrs = rng.standard_normal((16, c)) / 4, [4, 16], {}
    inits = [init("w", w.astype(f16)), init("b", rng.standard_normal(c).astype(f16))] + bn_arrays(rng, c, dtype=f16)
    nodes = [helper.make_node(producer, ["x", "w", "b"], ["p"], name="prod", **attrs), bn_node("p", "y")]
    model = make_model(nodes, [vi("x", x_shape, TensorProto.FLOAT16)], [vi("y", None, TensorProto.FLOAT16)], inits)
    new, rec = fold_managed(model)
    assert rec.stats == {"bn_total": 1, f"folded_into_{producer.lower()}": 1}
    got = initializers(new)
    assert {k: v.dtype for k, v in got.items()} == {"w": f16, "b": f16}
    # W' and b' are computed in float64 and rounded once to float16
    scale, shift = bn_factors64(model)
    w64 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w")).astype(np.float64)
    b64 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b")).astype(np.float64)
    w_expected = w64 * (scale.reshape(-1, 1, 1, 1) if producer == "Conv" else scale[None, :])
    assert np.array_equal(got["w"], w_expected.astype(f16))
    assert np.array_equal(got["b"], (b64 * scale + shift).astype(f16))
    # Numerics against the same model in float32: folding adds about one float16 rounding of the weights.
    ref32 = onnx.ModelProto()
    ref32.CopyFrom(model)
    for t in ref32.graph.initializer:
        t.CopyFrom(init(t.name, numpy_helper.to_array(t).astype(np.float32)))
    for v in list(ref32.graph.input) + list(ref32.graph.output):
        v.type.tensor_type.elem_type = F32
    x = feeds_for(model)["x"]
    ref = run(ref32, {"x": x.astype(np.float32)})["y"]
    err_orig = output_metrics("y", ref, run(model, {"x": x})["y"].astype(np.float32)).rel_l2
    err_new = output_metrics("y", ref, run(new, {"x": x})["y"].astype(np.float32)).rel_l2
    assert err_new <= 1e-3 and err_new <= 2 * err_orig


# -- forward folding ------------------------------------------------------------------------------------------------

def relu_bn(rng, c, x_shape, *, negative=False):
    """x -> Relu -> BN: a BN without a foldable producer."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "n")]
    return nodes, [vi("x", x_shape)], bn_arrays(rng, c, negative=negative)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
@pytest.mark.parametrize("pool", [None, "GlobalAveragePool", "GlobalMaxPool", "MaxPool"])
def test_forward_through_flatten_into_gemm(trans_b, with_c, pool):
    rng = np.random.default_rng(11 + trans_b + 2 * with_c)
    c, h, w_ = 3, 4, 4
    nodes, inputs, inits = relu_bn(rng, c, [2, c, h, w_])
    src = "n"
    hw = h * w_
    if pool:
        attrs = {"kernel_shape": [2, 2], "strides": [2, 2]} if pool == "MaxPool" else {}
        nodes.append(helper.make_node(pool, ["n"], ["p"], name="pool", **attrs))
        src, hw = "p", (1 if pool.startswith("Global") else 4)
    k, n = c * hw, 5
    wm = weight(rng, (n, k) if trans_b else (k, n), k)
    inits.append(init("fc_w", wm))
    gemm_in = ["f", "fc_w"]
    if with_c:
        inits.append(init("fc_b", rng.standard_normal(n).astype(np.float32)))
        gemm_in.append("fc_b")
    nodes += [helper.make_node("Flatten", [src], ["f"], name="flatten"),
              helper.make_node("Gemm", gemm_in, ["y"], name="fc", transB=trans_b, alpha=0.7, beta=1.3)]
    model = make_model(nodes, inputs, [vi("y", [2, n])], inits)
    new, rec = fold_managed(model)
    assert rec.changed is True and rec.stats == {"bn_total": 1, "folded_forward": 1}
    assert ops(new) == ["Relu"] + ([pool] if pool else []) + ["Flatten", "Gemm"]
    assert_same_numerics(model, new)


def test_forward_into_gemm_without_flatten():
    rng = np.random.default_rng(12)
    nodes, inputs, inits = relu_bn(rng, 6, [3, 6])
    inits.append(init("fc_w", rng.standard_normal((6, 2)).astype(np.float32)))
    nodes.append(helper.make_node("Gemm", ["n", "fc_w"], ["y"], name="fc"))
    model = make_model(nodes, inputs, [vi("y", [3, 2])], inits)
    new, rec = fold_managed(model)
    assert rec.stats == {"bn_total": 1, "folded_forward": 1}
    assert ops(new) == ["Relu", "Gemm"]
    assert_same_numerics(model, new)


def bn_pool_conv_model(rng, *, negative=False, pool=True, conv_attrs=None, group=1, bias=True):
    c, m = 4, 6
    nodes, inputs, inits = relu_bn(rng, c, [2, c, 10, 10], negative=negative)
    src = "n"
    if pool:
        nodes.append(helper.make_node("MaxPool", ["n"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                                      pads=[1, 1, 1, 1]))
        src = "p"
    inits.append(init("cw", weight(rng, (m, c // group, 3, 3), c // group * 9)))
    conv_in = [src, "cw"]
    if bias:
        inits.append(init("cb", rng.standard_normal(m).astype(np.float32)))
        conv_in.append("cb")
    nodes.append(helper.make_node("Conv", conv_in, ["y"], name="conv", group=group, **(conv_attrs or {})))
    return make_model(nodes, inputs, [vi("y", None)], inits)


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("conv_attrs", [{}, {"pads": [0, 0, 0, 0], "dilations": [2, 2]}, {"auto_pad": "VALID"}])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_through_maxpool_into_unpadded_conv(pool, group, conv_attrs, bias):
    rng = np.random.default_rng(13 + group + bias)
    model = bn_pool_conv_model(rng, pool=pool, group=group, conv_attrs=conv_attrs, bias=bias)
    new, rec = fold_managed(model)
    assert rec.changed is True and rec.stats == {"bn_total": 1, "folded_forward": 1}
    assert ops(new) == ["Relu"] + (["MaxPool"] if pool else []) + ["Conv"]
    assert_same_numerics(model, new)


def test_no_forward_through_maxpool_with_a_negative_scale():
    model = bn_pool_conv_model(np.random.default_rng(14), negative=True)
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_no_exact_target": 1}


@pytest.mark.parametrize("conv_attrs", [{"pads": [1, 1, 1, 1]}, {"pads": [0, 0, 1, 0]}, {"auto_pad": "SAME_UPPER"}])
def test_no_forward_into_a_padded_conv(conv_attrs):
    model = bn_pool_conv_model(np.random.default_rng(15), pool=False, conv_attrs=conv_attrs)
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_no_exact_target": 1}


def test_no_forward_when_the_bn_output_has_two_consumers():
    rng = np.random.default_rng(16)
    nodes, inputs, inits = relu_bn(rng, 3, [2, 3])
    inits.append(init("fc_w", rng.standard_normal((3, 2)).astype(np.float32)))
    nodes += [helper.make_node("Gemm", ["n", "fc_w"], ["y"], name="fc"), helper.make_node("Relu", ["n"], ["z"])]
    model = make_model(nodes, inputs, [vi("y", [2, 2]), vi("z", [2, 3])], inits)
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_no_exact_target": 1}


# -- standalone BN: keep or Mul+Add ---------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape", [[3, 5], [2, 5, 7], [2, 5, 4, 3], [1, 5, 2, 3, 4]])
def test_standalone_mul_add(x_shape):
    rng = np.random.default_rng(len(x_shape))
    c = x_shape[1]
    nodes, inputs, inits = relu_bn(rng, c, x_shape)
    nodes.append(helper.make_node("Relu", ["n"], ["y"], name="relu2"))
    model = make_model(nodes, inputs, [vi("y", x_shape)], inits)
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_no_exact_target": 1}  # default: keep
    new, rec = fold_managed(model, standalone="mul-add")
    assert rec.changed is True and rec.stats == {"bn_total": 1, "rewritten_mul_add": 1}
    assert ops(new) == ["Relu", "Mul", "Add", "Relu"]
    consts = initializers(new)
    assert sorted(v.shape for v in consts.values()) == [tuple([c] + [1] * (len(x_shape) - 2))] * 2
    assert_same_numerics(model, new)


def test_mul_add_keeps_bn_output_name_and_prefers_folding():
    """mul-add applies only to BNs that fold nowhere; the rewritten BN's output is still the graph output."""
    rng = np.random.default_rng(17)
    model = conv_bn_model(rng, tail=None)
    nodes = list(model.graph.node) + [helper.make_node("Relu", ["y"], ["r"], name="relu"),
                                      bn_node("r", "z", prefix="bn2", name="bn2")]
    model = make_model(nodes, list(model.graph.input), [vi("z", [2, 6, 7, 6])],
                       list(model.graph.initializer) + bn_arrays(rng, 6, prefix="bn2"))
    new, rec = fold_managed(model, standalone="mul-add")
    assert rec.stats == {"bn_total": 2, "folded_into_conv": 1, "rewritten_mul_add": 1}
    assert ops(new) == ["Conv", "Relu", "Mul", "Add"]
    assert [o.name for o in new.graph.output] == ["z"] and new.graph.node[-1].output[0] == "z"
    assert_same_numerics(model, new)


# -- negative cases: the graph is left alone, with the reason -------------------------------------------------------

@pytest.mark.parametrize("producer", ["Conv", "ConvTranspose", "Gemm", "MatMul"])
@pytest.mark.parametrize("storage", ["initializer", "Constant node"])
def test_shared_weight_is_not_modified(producer, storage):
    rng = np.random.default_rng(18)
    if producer in ("Conv", "ConvTranspose"):
        w, x_shape = weight(rng, (4, 4, 3, 3), 36), [1, 4, 5, 5]
    else:
        w, x_shape = weight(rng, (4, 4), 4), [2, 4]
    nodes = [
        helper.make_node(producer, ["x", "w"], ["c1"], name="p1"),
        helper.make_node(producer, ["x", "w"], ["c2"], name="p2"),
        bn_node("c1", "y"),
    ]
    inits = bn_arrays(rng, 4)
    if storage == "initializer":
        inits.append(init("w", w))
    else:
        nodes.insert(0, constant_node("w", w))
    model = make_model(nodes, [vi("x", x_shape)], [vi("y", None), vi("c2", None)], inits)
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_shared_weight": 1}


def test_shared_bias_is_not_modified():
    rng = np.random.default_rng(19)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b"], ["g1"], name="fc1"),
        helper.make_node("Gemm", ["x", "w2", "b"], ["g2"], name="fc2"),
        bn_node("g1", "y"),
    ]
    inits = [init("w1", rng.standard_normal((3, 4)).astype(np.float32)),
             init("w2", rng.standard_normal((3, 4)).astype(np.float32)),
             init("b", rng.standard_normal(4).astype(np.float32))] + bn_arrays(rng, 4)
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", None), vi("g2", None)], inits)
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_shared_weight": 1}


def test_producer_output_used_elsewhere():
    rng = np.random.default_rng(20)
    model = conv_bn_model(rng, tail=None)
    nodes = list(model.graph.node) + [helper.make_node("Relu", ["c"], ["r"], name="other")]
    model = make_model(nodes, list(model.graph.input), [vi("y", None), vi("r", None)],
                       list(model.graph.initializer))
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_producer_output_used_elsewhere": 1}


def test_producer_output_is_graph_output():
    rng = np.random.default_rng(21)
    model = conv_bn_model(rng, tail=None)
    model = make_model(list(model.graph.node), list(model.graph.input), [vi("y", None), vi("c", None)],
                       list(model.graph.initializer))
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_producer_output_is_graph_output": 1}


@pytest.mark.parametrize("opset", [9, 15])
def test_training_mode(opset):
    rng = np.random.default_rng(22)
    attrs = {"training_mode": 1} if opset >= 14 else {}
    model = conv_bn_model(rng, tail=None, opset=opset)
    nodes = list(model.graph.node)
    # opset 9: training is implied by using the optional outputs (it allows 1 or 5 of them)
    outs = ["y", "running_mean", "running_var"] + (["saved_mean", "saved_var"] if opset < 14 else [])
    bn = helper.make_node("BatchNormalization", list(nodes[1].input), outs, name="bn", **attrs)
    model = make_model([nodes[0], bn], list(model.graph.input),
                       [vi("y", [2, 6, 7, 6]), vi("running_mean", [6]), vi("running_var", [6])],
                       list(model.graph.initializer), opset=opset)
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_training_mode": 1}


def test_non_constant_bn_params():
    rng = np.random.default_rng(23)
    model = conv_bn_model(rng, tail=None)
    inits = [t for t in model.graph.initializer if t.name != "bn_gamma"]
    model = make_model(list(model.graph.node), list(model.graph.input) + [vi("bn_gamma", [6])],
                       list(model.graph.output), inits)
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_non_constant_params": 1}
    assert assert_unchanged(model, standalone="mul-add") == {"bn_total": 1, "skipped_non_constant_params": 1}


def test_non_constant_producer_weight():
    rng = np.random.default_rng(24)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    model = make_model(nodes, [vi("x", [1, 3, 5, 5]), vi("w", [4, 3, 3, 3])], [vi("y", None)], bn_arrays(rng, 4))
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_non_constant_producer_weight": 1}


def test_bn_after_relu_with_nothing_foldable_after():
    rng = np.random.default_rng(25)
    nodes, inputs, inits = relu_bn(rng, 3, [1, 3, 4, 4])
    nodes.append(helper.make_node("Sigmoid", ["n"], ["y"], name="sig"))
    model = make_model(nodes, inputs, [vi("y", None)], inits)
    assert assert_unchanged(model) == {"bn_total": 1, "skipped_no_exact_target": 1}


def test_no_bn_at_all():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    assert assert_unchanged(model) == {"bn_total": 0}


# -- whole models, CLI ----------------------------------------------------------------------------------------------

def test_mixed_graph_accounts_for_every_bn():
    """One graph with a backward fold, a forward fold and a kept BN; stats add up; numerics hold."""
    rng = np.random.default_rng(26)
    model = conv_bn_model(rng, tail="Relu")  # conv -> bn -> relu -> y  [2, 6, 7]
    nodes = list(model.graph.node)
    nodes += [bn_node("y", "n2", prefix="bn2", name="bn2"),  # after Relu: forward into the fc
              helper.make_node("Flatten", ["n2"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc_w"], ["o"], name="fc"),
              bn_node("y", "z", prefix="bn3", name="bn3"),  # after Relu, feeds a graph output: kept
              ]
    inits = (list(model.graph.initializer) + bn_arrays(rng, 6, prefix="bn2") + bn_arrays(rng, 6, prefix="bn3")
             + [init("fc_w", weight(rng, (252, 3), 252))])
    model = make_model(nodes, list(model.graph.input), [vi("o", [2, 3]), vi("z", [2, 6, 7, 6])], inits)
    new, rec = fold_managed(model)
    assert rec.stats == {"bn_total": 3, "folded_into_conv": 1, "folded_forward": 1, "skipped_no_exact_target": 1}
    assert ops(new) == ["Conv", "Relu", "Flatten", "Gemm", "BatchNormalization"]
    assert_same_numerics(model, new)


def test_zoo_resnet18_folds_every_bn():
    zoo = pytest.importorskip("models.zoo")
    model = zoo.build_resnet18(1, 32, 32, 0)
    n_bn = ops(model).count("BatchNormalization")
    new, rec = fold_managed(model)
    assert rec.stats == {"bn_total": n_bn, "folded_into_conv": n_bn}
    assert "BatchNormalization" not in ops(new)
    assert len(new.graph.node) == len(model.graph.node) - n_bn
    feeds = feeds_for(model)
    m = output_metrics("logits", run(model, feeds)["logits"], run(new, feeds)["logits"])
    assert m.rel_l2 <= 1e-6


def test_cli_run_end_to_end(tmp_path):
    from click.testing import CliRunner

    from onnxopt.cli import cli

    rng = np.random.default_rng(27)
    model = conv_bn_model(rng)
    nodes = list(model.graph.node) + [bn_node("y", "z", prefix="bn2", name="bn2")]  # standalone after Relu
    model = make_model(nodes, list(model.graph.input), [vi("z", [2, 6, 7, 6])],
                       list(model.graph.initializer) + bn_arrays(rng, 6, prefix="bn2"))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    src_bytes = src.read_bytes()
    out, record = tmp_path / "o.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["run", str(src), "-o", str(out), "-p", "fold-bn:standalone=mul-add",
                                   "--json", str(record), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert src.read_bytes() == src_bytes
    new = onnx.load(out)
    assert ops(new) == ["Conv", "Relu", "Mul", "Add"]
    rec = json.loads(record.read_text())
    assert rec["passes"][0]["name"] == "fold-bn"
    assert rec["passes"][0]["stats"] == {"bn_total": 2, "folded_into_conv": 1, "rewritten_mul_add": 1}
    assert rec["validation"]["ok"] is True
    assert_same_numerics(model, new)


DIGITS_MODEL = ROOT / "models" / "digits_resnet.onnx"
DIGITS_DATA = ROOT / "models" / "digits.npz"


@pytest.mark.skipif(not (DIGITS_MODEL.exists() and DIGITS_DATA.exists()),
                    reason="models/digits_resnet.onnx or models/digits.npz not built (python models/make_digits.py)")
def test_digits_resnet_default_pipeline():
    from onnxopt.model import load
    from onnxopt.pipeline import DEFAULT_PIPELINE, from_specs
    from onnxopt.registry import load_registry

    model = load(DIGITS_MODEL)
    assert "BatchNormalization" in ops(model)
    new, record = PassManager(from_specs(list(DEFAULT_PIPELINE), load_registry())).run(model, PassContext())
    assert "BatchNormalization" not in ops(new)
    x = np.load(DIGITS_DATA)["test_input"].astype(np.float32)
    ref, got = run(model, {"input": x})["logits"], run(new, {"input": x})["logits"]
    assert np.array_equal(ref.argmax(1), got.argmax(1))  # 100% top-1 agreement
    assert output_metrics("logits", ref, got).rel_l2 <= 1e-6
