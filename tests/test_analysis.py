"""Tests of onnxopt.analysis: published figures of the zoo models, an independent per-layer count, MAC formulas of
every MAC op, parameter conventions, peak activation memory worked out by hand, dynamic shapes, summarize()."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.analysis import analyze, einsum_macs, matmul_macs, summarize
from onnxopt.errors import OptionsError, PreconditionError
from onnxopt.pass_base import PassContext
from onnxopt.shapes import value_shapes
from onnxopt.skeleton import Skeleton, typed_shapes
from tests.helpers import init, make_model, vi



# -- builders -------------------------------------------------------------------------------------------------------

def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# -- the zoo: published figures and an independent per-layer count --------------------------------------------------

#: name -> (params in PyTorch's convention, Conv+Gemm MACs) at 1x3x224x224 (torchvision / the papers; NOTES.md)
PUBLISHED = {
    "resnet18": (11_689_512, 1_814_073_344),
    "resnet50": (25_557_032, 4_089_184_256),
    "mobilenetv2": (3_504_872, 300_774_272),
}


@pytest.fixture(scope="module")
def zoo():
    """The three classifiers at 1x3x224x224 with their analysis and (independently) fully inferred shapes."""
    from models.zoo import ZOO

    out = {}
    for name in PUBLISHED:
        model = ZOO[name](batch=1, height=224, width=224, seed=0)
        full = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # on the full model, not the skeleton
        out[name] = (model, analyze(model, check=True), value_shapes(full))
    return out


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_params_and_macs(zoo, name):
    model, a, _ = zoo[name]
    params, macs = PUBLISHED[name]
    assert a.params == params
    assert a.macs == macs
    assert a.complete
    # BN running statistics are buffers: two per-channel tensors per BatchNormalization
    inits = {t.name: t for t in model.graph.initializer}
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert a.buffers == sum(2 * inits[n.input[3]].dims[0] for n in bn)
    assert summarize(model, PassContext())["macs"] == macs
    assert summarize(model, PassContext())["params"] == params


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_every_conv_and_gemm_layer_against_hand_formula(zoo, name):
    """MACs from the weight shapes and the output shapes of ONNX shape inference on the full model."""
    model, a, shapes = zoo[name]
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    checked = 0
    hand_params = 0
    for node in model.graph.node:
        attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if node.op_type == "Conv":
            oc, ic_per_group, kh, kw = inits[node.input[1]]
            n, oc2, oh, ow = shapes[node.output[0]]
            ic = shapes[node.input[0]][1]
            groups = attrs.get("group", 1)
            assert oc == oc2 and ic_per_group == ic // groups
            expected = n * oc * oh * ow * kh * kw * (ic // groups)
            hand_params += oc * ic_per_group * kh * kw + (oc if len(node.input) > 2 else 0)
        elif node.op_type == "Gemm":
            m_, k = shapes[node.input[0]]
            out_f, k2 = inits[node.input[1]]  # transB=1: weight [out, in]
            assert attrs.get("transB") == 1 and k == k2
            expected = m_ * k * out_f
            hand_params += out_f * k + out_f
        elif node.op_type == "MatMul":
            raise AssertionError("the zoo classifiers have no MatMul")
        else:
            if node.op_type == "BatchNormalization":
                hand_params += 2 * inits[node.input[1]][0]
            assert a.by_name[node.name].macs == 0, node.name
            continue
        assert a.by_name[node.name].macs == expected, node.name
        checked += 1
    assert checked == sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm"))
    assert hand_params == a.params


def test_depthwise_layers_of_mobilenetv2(zoo):
    model, a, shapes = zoo["mobilenetv2"]
    dw = [n for n in model.graph.node if n.op_type == "Conv"
          and any(x.name == "group" and x.i > 1 for x in n.attribute)]
    assert len(dw) == 17
    first = dw[0]  # features.1: 32 channels, 112x112, 3x3 depthwise
    assert a.by_name[first.name].macs == 32 * 112 * 112 * 3 * 3 * 1


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "yolo", "unet"])
def test_skeleton_inference_equals_full_inference(name):
    """Shape inference on the weight-stripped skeleton gives the shapes (and types) inference on the model gives."""
    from models.zoo import ZOO

    model = ZOO[name]()
    full = typed_shapes(onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True))
    skel = Skeleton(model)
    assert skel.stripped  # something was stripped
    assert len(skel.model.SerializeToString()) < model.ByteSize() / 20
    fast = typed_shapes(skel.infer(strict=True))
    assert {k: v for k, v in fast.items() if k in full} == full


def test_skeleton_check_catches_truncated_weights():
    rng = np.random.default_rng(0)
    w = init("w", rand(rng, 64, 32, 3, 3))
    w.raw_data = w.raw_data[:-4]
    m = onnx.ModelProto()
    m.CopyFrom(make_model([helper.make_node("Conv", ["x", "w2"], ["y"], name="conv")],
                          [vi("x", [1, 32, 8, 8])], [vi("y", [1, 64, 6, 6])], [init("w2", rand(rng, 64, 32, 3, 3))]))
    m.graph.initializer[0].CopyFrom(w)
    m.graph.node[0].input[1] = "w"
    from onnxopt.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="'w'.*bytes of data"):
        Skeleton(m).check()


# -- MAC formulas -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "sa, sb, expected",
    [
        ((4, 8), (8, 5), 4 * 8 * 5),
        ((2, 1, 4, 8), (3, 8, 5), 2 * 3 * 4 * 8 * 5),  # batch dims broadcast to (2, 3)
        ((7, 4, 8), (8, 5), 7 * 4 * 8 * 5),  # a 2-D weight shared over the batch
        ((8,), (8, 5), 8 * 5),  # 1-D A is a row vector
        ((6, 4, 8), (8,), 6 * 4 * 8),  # 1-D B is a column vector
        ((8,), (8,), 8),  # dot product
    ],
)
def test_matmul_broadcasting(sa, sb, expected):
    m = make_model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                   [vi("a", list(sa)), vi("b", list(sb))], [vi("y", None)])
    a = analyze(m)
    assert a.by_name["mm"].macs == expected == matmul_macs(sa, sb)
    assert a.params == 0  # two activations: no parameters
    y_shape = a.by_name["mm"].output_shapes[0]
    assert tuple(y_shape) == np.matmul(np.zeros(sa), np.zeros(sb)).shape


def test_matmul_mismatch_is_unknown_not_zero():
    with pytest.raises(ValueError, match="inner dims"):
        matmul_macs((4, 8), (7, 5))


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_trans_and_bias(trans_a, trans_b, bias):
    m_, k, n = 3, 10, 7
    rng = np.random.default_rng(1)
    b = rand(rng, n, k) if trans_b else rand(rng, k, n)
    inits = [init("B", b)] + ([init("C", rand(rng, n))] if bias else [])
    node = helper.make_node("Gemm", ["A", "B"] + (["C"] if bias else []), ["Y"], name="gemm", transA=trans_a,
                            transB=trans_b, alpha=0.5)
    model = make_model([node], [vi("A", [k, m_] if trans_a else [m_, k])], [vi("Y", [m_, n])], inits)
    a = analyze(model)
    layer = a.by_name["gemm"]
    assert layer.macs == m_ * k * n
    assert layer.flops == (m_ * n if bias else 0)  # the bias add is a FLOP per output element, not a MAC
    assert a.params == k * n + (n if bias else 0) == layer.params


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_transpose(groups, stride):
    n, ic, oc, h, w, k = 2, 8, 12, 5, 6, 3
    rng = np.random.default_rng(2)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv", group=groups,
                            strides=[stride, stride], kernel_shape=[k, k])
    model = make_model([node], [vi("x", [n, ic, h, w])], [vi("y", None)],
                       [init("w", rand(rng, ic, oc // groups, k, k)), init("b", rand(rng, oc))])
    a = analyze(model)
    layer = a.by_name["deconv"]
    # every input pixel of every input channel is scattered over a k x k window of oc / groups output channels
    assert layer.macs == n * h * w * ic * k * k * (oc // groups)
    oh, ow = (h - 1) * stride + k, (w - 1) * stride + k
    assert layer.output_shapes == [[n, oc, oh, ow]]
    assert layer.flops == n * oc * oh * ow  # bias
    assert layer.params == ic * (oc // groups) * k * k + oc


@pytest.mark.parametrize("groups, oc", [(1, 16), (2, 16), (8, 16), (8, 8)])  # (8, 8) is depthwise
@pytest.mark.parametrize("stride, pad, dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_grouped_conv(groups, oc, stride, pad, dilation):
    n, ic, h, w, k = 1, 8, 11, 10, 3
    rng = np.random.default_rng(3)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=groups, strides=[stride] * 2,
                            pads=[pad] * 4, dilations=[dilation] * 2)
    model = make_model([node], [vi("x", [n, ic, h, w])], [vi("y", None)],
                       [init("w", rand(rng, oc, ic // groups, k, k))])
    a = analyze(model)
    oh = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    ow = (w + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    assert a.by_name["conv"].output_shapes == [[n, oc, oh, ow]]
    assert a.by_name["conv"].macs == oc * oh * ow * k * k * (ic // groups)
    assert a.by_name["conv"].flops == 0  # no bias


@pytest.mark.parametrize(
    "equation, shapes, macs, flops",
    [
        ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], 2 * 3 * 4 * 5, 0),
        ("ij,jk", [(3, 4), (4, 5)], 3 * 4 * 5, 0),  # implicit output "ik"
        ("bhqd,bhkd->bhqk", [(2, 4, 6, 8), (2, 4, 7, 8)], 2 * 4 * 6 * 7 * 8, 0),  # attention scores
        ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 6)], 2 * 5 * 3 * 4 * 6, 0),  # broadcast ellipsis
        ("i,j->ij", [(3,), (4,)], 3 * 4, 0),  # outer product: one multiply per output
        ("ij->i", [(3, 4)], 0, 3 * 4),  # one-operand reduction: FLOPs only
        ("ij->ji", [(3, 4)], 0, 0),  # transpose
    ],
)
def test_einsum(equation, shapes, macs, flops):
    assert einsum_macs(equation, list(shapes)) == (macs, flops)
    names = [f"x{i}" for i in range(len(shapes))]
    out_shape = np.einsum(equation, *[np.zeros(s) for s in shapes]).shape
    model = make_model([helper.make_node("Einsum", names, ["y"], name="e", equation=equation)],
                       [vi(nm, list(s)) for nm, s in zip(names, shapes)], [vi("y", list(out_shape))])
    a = analyze(model)
    assert (a.by_name["e"].macs, a.by_name["e"].flops) == (macs, flops)


@pytest.mark.parametrize(
    "equation, shapes, reason",
    [
        ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], "contraction order"),
        ("ii,ij->j", [(3, 3), (3, 4)], "repeated index"),
        ("ij,jk->i", [(2, 3), (3, 4)], "summed within one operand"),
    ],
)
def test_einsum_without_matmul_like_cost_is_unknown_with_reason(equation, shapes, reason):
    names = [f"x{i}" for i in range(len(shapes))]
    model = make_model([helper.make_node("Einsum", names, ["y"], name="e", equation=equation)],
                       [vi(nm, list(s)) for nm, s in zip(names, shapes)], [vi("y", None)])
    a = analyze(model)
    assert a.by_name["e"].macs is None and reason in a.by_name["e"].note
    assert not a.complete
    assert summarize(model)["macs"] is None and reason in summarize(model)["macs_note"]


def test_attention_chain_of_matmuls():
    """Q·Kᵀ -> Softmax -> ·V, as exported from PyTorch: two activation MatMuls, no parameters."""
    b, h, s, d = 2, 4, 16, 8
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"], name="pv"),
    ]
    model = make_model(nodes, [vi(x, [b, h, s, d]) for x in "qkv"], [vi("y", [b, h, s, d])])
    a = analyze(model)
    assert a.by_name["qk"].macs == b * h * s * d * s
    assert a.by_name["pv"].macs == b * h * s * s * d
    assert a.by_name["softmax"].flops == 5 * b * h * s * s
    assert a.macs == 2 * b * h * s * s * d and a.params == 0


def test_unit_costs_of_non_mac_ops():
    """A few FLOP unit costs from the table in the module docstring (per output element unless noted)."""
    n, c, h, w = 1, 4, 8, 8
    e = n * c * h * w
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Sigmoid", ["r"], ["s"], name="sigmoid"),
        helper.make_node("Add", ["s", "x"], ["a"], name="add"),
        helper.make_node("Sum", ["a", "s", "x"], ["su"], name="sum3"),
        helper.make_node("MaxPool", ["su"], ["mp"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["mp", "g", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Resize", ["bn", "", "scales"], ["up"], name="resize_linear", mode="linear"),
        helper.make_node("Resize", ["up", "", "scales"], ["up2"], name="resize_nearest", mode="nearest"),
        helper.make_node("GlobalAveragePool", ["up2"], ["gap"], name="gap"),
        helper.make_node("Reshape", ["gap", "shape"], ["y"], name="reshape"),
    ]
    inits = [init(k, rng.uniform(0.5, 1.5, c).astype(np.float32)) for k in "gbmv"]
    inits += [init("scales", np.array([1, 1, 2, 2], np.float32)), init("shape", np.array([1, c], np.int64))]
    a = analyze(make_model(nodes, [vi("x", [n, c, h, w])], [vi("y", [1, c])], inits))
    f = {layer.name: layer.flops for layer in a.layers}
    assert f == {
        "relu": e, "sigmoid": 4 * e, "add": e, "sum3": 2 * e,
        "maxpool": 4 * (e // 4),  # 2x2 window per output
        "bn": 2 * (e // 4),
        "resize_linear": 7 * e,  # bilinear: 4 multiplies + 3 adds per output
        "resize_nearest": 0,
        "gap": 4 * e + c,  # an add per input element, a divide per output
        "reshape": 0,
    }
    assert a.macs == 0 and a.params == 2 * c and a.buffers == 2 * c and a.constants == 4 + 2


# -- parameter conventions ------------------------------------------------------------------------------------------

def test_shared_initializer_counted_once_and_constants_are_not_params():
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),  # the same weight
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r"], name="relu6"),
        helper.make_node("Mul", ["r", "half"], ["m"], name="scale"),  # a scalar constant
        helper.make_node("Flatten", ["m"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc_w"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "fc_b"], ["y"], name="fc_bias"),  # MatMul + Add: a Linear's bias
    ]
    inits = [
        init("w", rand(rng, 4, 4, 3, 3)), init("lo", np.array(0, np.float32)), init("hi", np.array(6, np.float32)),
        init("half", np.array(0.5, np.float32)), init("fc_w", rand(rng, 4 * 5 * 5, 10)), init("fc_b", rand(rng, 10)),
    ]
    a = analyze(make_model(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", [1, 10])], inits))
    assert a.params == 4 * 4 * 3 * 3 + 100 * 10 + 10
    assert a.constants == 3  # Clip bounds and the scalar
    assert a.by_name["conv1"].params == 144 and a.by_name["conv2"].params == 0  # attributed to the first consumer
    assert a.by_name["fc_bias"].params == 10
    assert a.by_name["conv1"].macs == a.by_name["conv2"].macs == 4 * 5 * 5 * 3 * 3 * 4
    assert a.weight_bytes == 4 * (144 + 1000 + 10 + 3)


def test_quantized_weight_through_dequantize_linear_counts_as_params():
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dq", axis=0),
        helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv"),
    ]
    inits = [init("wq", rng.integers(-127, 127, (8, 4, 3, 3)).astype(np.int8)),
             init("ws", np.full(8, 0.01, np.float32)), init("wz", np.zeros(8, np.int8)), init("b", rand(rng, 8))]
    a = analyze(make_model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", None)], inits))
    assert a.params == 8 * 4 * 9 + 8 and a.by_name["conv"].params == 8 * 4 * 9 + 8
    assert a.constants == 16  # scales and zero points
    assert a.weight_bytes == 8 * 4 * 9 * 1 + 8 * 4 + 8 + 8 * 4


# -- peak activation memory -----------------------------------------------------------------------------------------

def _peak_model(x_is_output: bool) -> onnx.ModelProto:
    """x[1,4,8,8] -> Relu a -> Conv b[1,8,8,8] -> Relu c -> Concat(a, c) d[1,12,8,8] -> GAP y[1,12,1,1]."""
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="n0"),
        helper.make_node("Conv", ["a", "w"], ["b"], name="n1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["c"], name="n2"),
        helper.make_node("Concat", ["a", "c"], ["d"], name="n3", axis=1),
        helper.make_node("GlobalAveragePool", ["d"], ["y"], name="n4"),
    ]
    outputs = [vi("y", [1, 12, 1, 1])] + ([vi("x", [1, 4, 8, 8])] if x_is_output else [])
    return make_model(nodes, [vi("x", [1, 4, 8, 8])], outputs, [init("w", rand(rng, 8, 4, 3, 3))])


def test_peak_memory_by_hand():
    # bytes: x = a = 4*8*8*4 = 1024, b = c = 8*8*8*4 = 2048, d = 12*8*8*4 = 3072, y = 12*4 = 48; w is a weight.
    # live (producer step .. last reader step): x 0..0, a 0..3, b 1..2, c 2..3, d 3..4, y 4..4 (output)
    # step 0: x + a = 2048; step 1: a + b = 3072; step 2: a + b + c = 5120; step 3: a + c + d = 6144; step 4: d + y
    a = analyze(_peak_model(False))
    assert a.peak.bytes == 6144 and a.peak.node == "n3" and a.peak.step == 3
    assert a.peak.live == [("d", 3072), ("c", 2048), ("a", 1024)]
    assert [layer.output_bytes for layer in a.layers] == [1024, 2048, 2048, 3072, 48]


def test_peak_memory_graph_output_stays_live():
    # x is also a graph output: live 0..4, so every step carries 1024 more; the peak is still step 3
    a = analyze(_peak_model(True))
    assert a.peak.bytes == 6144 + 1024 and a.peak.node == "n3"


# -- dynamic shapes -------------------------------------------------------------------------------------------------

def _dynamic_conv():
    rng = np.random.default_rng(8)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    return make_model([node], [vi("x", ["N", 3, "H", "W"])], [vi("y", ["N", 8, "H", "W"])],
                      [init("w", rand(rng, 8, 3, 3, 3))])


def test_dynamic_input_without_shape_is_refused_naming_the_input():
    with pytest.raises(PreconditionError, match=r"dynamic input dims: x\['N', 3, 'H', 'W'\].*--input-shape"):
        analyze(_dynamic_conv())
    s = summarize(_dynamic_conv(), PassContext())
    assert s["macs"] is None and "dynamic input dims" in s["macs_note"] and s["nodes"] == 1


@pytest.mark.parametrize("n, h, w", [(1, 8, 8), (4, 16, 12)])
def test_dynamic_input_with_shape(n, h, w):
    a = analyze(_dynamic_conv(), {"x": (n, 3, h, w)})
    assert a.macs == n * 8 * h * w * 3 * 3 * 3
    assert summarize(_dynamic_conv(), PassContext(input_shapes={"x": (n, 3, h, w)}))["macs"] == a.macs


def test_input_shape_errors():
    with pytest.raises(OptionsError, match="unknown input"):
        analyze(_dynamic_conv(), {"nope": (1, 3, 8, 8)})
    with pytest.raises(OptionsError, match="rank"):
        analyze(_dynamic_conv(), {"x": (1, 3, 8)})


def test_custom_op_is_unknown_not_zero():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Frobnicate", ["r"], ["y"], name="custom", domain="example.com")]
    g = helper.make_graph(nodes, "g", [vi("x", [1, 4])], [vi("y", [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.com", 1)])
    a = analyze(m)
    assert a.by_name["custom"].macs is None and "custom op example.com::Frobnicate" in a.by_name["custom"].note
    assert a.macs == 0 and not a.complete
    s = summarize(m, PassContext())
    assert s["macs"] is None and "Frobnicate" in s["macs_note"]


def test_summarize_keeps_graph_summary_keys():
    from onnxopt.pass_manager import graph_summary

    m = _peak_model(False)
    s = summarize(m, PassContext())
    base = graph_summary(m)
    assert {k: s[k] for k in base} == base
    assert s["params"] == 8 * 4 * 9 and s["macs"] == 8 * 8 * 8 * 9 * 4 and s["peak_activation_bytes"] == 6144
    assert math.isclose(s["weight_bytes"], 4 * 8 * 4 * 9)


# -- reading a model file without its weights ---------------------------------------------------------------------

def test_read_structure_matches_full_load(tmp_path):
    from models.zoo import ZOO
    from onnxopt.skeleton import read_structure

    model = ZOO["resnet18"](batch=1, height=64, width=64, seed=0)
    path = tmp_path / "r18.onnx"
    onnx.save(model, path)
    m, payloads = read_structure(path)
    assert [n.SerializeToString() for n in m.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert m.graph.input == model.graph.input and m.graph.output == model.graph.output
    assert m.opset_import == model.opset_import and m.ir_version == model.ir_version
    full = {t.name: t for t in model.graph.initializer}
    assert [t.name for t in m.graph.initializer] == list(full)
    for t in m.graph.initializer:
        ref = full[t.name]
        assert (list(t.dims), t.data_type) == (list(ref.dims), ref.data_type)
        if t.name in payloads:  # data dropped, its size recorded
            assert t.raw_data == b"" and payloads[t.name] == ("raw", len(ref.raw_data))
        else:
            assert t == ref
    assert len(payloads) == sum(1 for t in model.graph.initializer if math.prod(t.dims) > 1024)
    skel = Skeleton(m, payloads)
    skel.check()
    assert analyze(m, skeleton=skel).to_dict() == analyze(model).to_dict()


def _typed_model(elem, n, claimed=None):
    """y = x + c with a 1-D initializer c stored in a typed field (float_data / int32_data), not raw_data."""
    values = np.arange(n) % 7
    c = helper.make_tensor("c", elem, [claimed or n], values.astype(np.float32).tolist(), raw=False)
    g = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"], name="add")], "g",
                          [vi("x", [claimed or n], elem)], [vi("y", [claimed or n], elem)], [c])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("elem", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE])
def test_read_structure_typed_data_fields(tmp_path, elem):
    from onnxopt.errors import ModelLoadError
    from onnxopt.skeleton import read_structure

    path = tmp_path / "typed.onnx"
    onnx.save(_typed_model(elem, 3000), path)
    m, payloads = read_structure(path)
    assert payloads == {"c": ("count", 3000)}
    Skeleton(m, payloads).check()
    assert analyze(m).params == 3000
    bad = _typed_model(elem, 3000)
    bad.graph.initializer[0].dims[0] = 3001  # claims one more value than it holds
    onnx.save(bad, path)
    m, payloads = read_structure(path)
    with pytest.raises(ModelLoadError, match="'c': 3000 values for shape \\[3001\\]"):
        Skeleton(m, payloads).check()


def test_read_structure_bad_files(tmp_path):
    from models.zoo import ZOO
    from onnxopt.errors import ModelLoadError
    from onnxopt.skeleton import read_structure

    data = ZOO["mobilenetv2"](batch=1, height=32, width=32).SerializeToString()
    cases = {
        "truncated.onnx": (data[: len(data) // 2], "truncated or corrupt ONNX protobuf"),
        "text.onnx": (b"hello, this is not a model\n" * 10, "not an ONNX protobuf"),
        "empty.onnx": (b"", "file is empty"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelLoadError, match=message):
            read_structure(tmp_path / name)
    with pytest.raises(ModelLoadError, match="no such file"):
        read_structure(tmp_path / "missing.onnx")


def test_read_structure_external_data(tmp_path):
    from models.zoo import ZOO
    from onnxopt.errors import ModelLoadError
    from onnxopt.skeleton import read_structure

    model = ZOO["resnet18"](batch=1, height=64, width=64, seed=0)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=1024)
    m, payloads = read_structure(path)
    assert payloads == {}
    skel = Skeleton(m, payloads)
    skel.check()
    assert analyze(m, skeleton=skel).to_dict() == analyze(model).to_dict()
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="external data file 'ext.onnx.data' not found"):
        read_structure(path)


def test_control_flow_is_unknown_and_its_captures_stay_live():
    then_g = helper.make_graph([helper.make_node("Concat", ["a", "a"], ["t"], name="then_cat", axis=1)], "then", [],
                               [vi("t", [1, 512])])
    else_g = helper.make_graph([helper.make_node("Neg", ["a"], ["n"], name="else_neg"),
                                helper.make_node("Concat", ["a", "n"], ["e"], name="else_cat", axis=1)], "else", [],
                               [vi("e", [1, 512])])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    m = make_model(nodes, [vi("x", [1, 256]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 512])])
    a = analyze(m)
    assert a.by_name["branch"].macs is None and "control flow (If)" in a.by_name["branch"].note
    # 'a' (1 KiB) is read inside the If's subgraphs, so it is live at the If's step with cond (1 B) and y (2 KiB);
    # step 0 holds x, a and cond (2 KiB + 1 B)
    assert a.peak.step == 1 and a.peak.bytes == 1024 + 1 + 2048
    assert a.peak.live == [("y", 2048), ("a", 1024), ("cond", 1)]
