"""Tests of the ``convert-precision`` pass: placement of Casts, what stays float32, constants, numerics in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.model import load
from onnxopt.optimize import optimize
from onnxopt.pass_base import PassContext
from onnxopt.passes.convert_precision import DEFAULT_BLOCK_OPS, FP16_MAX, ConvertPrecision
from onnxopt.validate import output_metrics, random_inputs, run, session

ROOT = Path(__file__).resolve().parents[2]
F32, F16, BF16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT64


def make_model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def convert(model, **options):
    res = optimize(model, [ConvertPrecision(**options)], ctx=PassContext(), validate=False)
    return res.model, res.record.passes[0]


def ops(model):
    return [n.op_type for n in model.graph.node]


def elem_types(model):
    """Element type of every value in the (inferred) model."""
    from onnxopt.shapes import value_types

    return value_types(onnx.shape_inference.infer_shapes(model, strict_mode=True))


def check_casts_at_boundaries(model, low=F16):
    """Every Cast converts between float32 and ``low`` where the two precisions meet: a float32 producer (or graph
    input) on one side, readers computing in the other precision (or a graph output) on the other."""
    types = elem_types(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    n_casts = 0
    for n in model.graph.node:
        if n.op_type != "Cast":
            continue
        n_casts += 1
        src, dst = types[n.input[0]], types[n.output[0]]
        assert {src, dst} == {F32, low}, (n.name, src, dst)
        p = producers.get(n.input[0])
        assert p is None or p.op_type != "Cast", f"{n.name}: Cast of a Cast"
        assert p is not None or src == F32, f"{n.name}: casts a graph input that is not float32"
        if p is not None:  # the producer computes in the source precision
            assert all(types[o] != dst for o in p.output if o in types and types[o] in (F32, low)), n.name
        for r in readers.get(n.output[0], []):  # every reader computes in the target precision
            assert any(types.get(o) == dst for o in r.output), (n.name, r.name)
        assert readers.get(n.output[0]) or n.output[0] in outputs, n.name
    return n_casts


def rel_l2(ref, new):
    return output_metrics("y", ref, new).rel_l2


# -- tiny graphs ---------------------------------------------------------------------------------------------------

def conv_softmax(seed=0):
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) / 5).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Softmax", ["r"], ["y"], name="softmax", axis=1)]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])], inits)


def test_fp16_casts_only_at_boundaries_and_softmax_stays_fp32():
    m = conv_softmax()
    new, rec = convert(m)
    assert rec.changed
    assert ops(new) == ["Cast", "Conv", "Relu", "Cast", "Softmax"]
    t = elem_types(new)
    assert t["x"] == F32 and t["y"] == F32  # I/O kept float32
    conv = new.graph.node[1]
    assert [t[i] for i in conv.input] == [F16, F16, F16]  # weights and bias converted
    assert t[new.graph.node[4].input[0]] == F32  # Softmax (blocked) reads float32
    assert rec.stats["converted_nodes"] == 2 and rec.stats["kept_fp32_block_ops"] == 1
    assert rec.stats["casts_inserted"] == 2 and rec.stats["converted_constants"] == 2
    check_casts_at_boundaries(new)
    feeds = random_inputs(m, seed=1)
    assert rel_l2(run(m, feeds)["y"], run(new, feeds)["y"]) < 1e-2


def test_keep_io_types_false_converts_io_and_block_ops_can_be_emptied():
    m = conv_softmax()
    new, rec = convert(m, keep_io_types=False, block_ops=())
    assert ops(new) == ["Conv", "Relu", "Softmax"]
    t = elem_types(new)
    assert t["x"] == F16 and t["y"] == F16
    assert rec.stats["io_converted"] == 2 and rec.stats["converted_nodes"] == 3
    feeds = {"x": random_inputs(m, seed=1)["x"].astype(np.float16)}
    ref = run(m, {"x": feeds["x"].astype(np.float32)})["y"]
    assert rel_l2(ref, run(new, feeds)["y"].astype(np.float32)) < 1e-2


def test_keep_io_types_false_with_a_blocked_op_at_the_output():
    new, rec = convert(conv_softmax(), keep_io_types=False)
    assert ops(new) == ["Conv", "Relu", "Cast", "Softmax", "Cast"]
    t = elem_types(new)
    assert t["x"] == F16 and t["y"] == F16 and t[new.graph.node[3].output[0]] == F32
    assert check_casts_at_boundaries(new) == 2


def test_block_nodes_by_name_pattern():
    new, rec = convert(conv_softmax(), block_nodes=("rel*",))
    assert ops(new) == ["Cast", "Conv", "Cast", "Relu", "Softmax"]
    assert rec.stats["kept_fp32_block_nodes"] == 1 and rec.stats["converted_nodes"] == 1


def test_resize_scales_stay_float32_and_shape_inputs_untouched():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(rng.standard_normal((2, 2, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["u"], name="up", mode="nearest"),
             helper.make_node("Conv", ["u", "w"], ["c"], name="conv"),
             helper.make_node("Shape", ["c"], ["s"], name="shape_of"),
             helper.make_node("Reshape", ["c", "shape"], ["y"], name="flat")]
    m = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 128]), vi("s", [4], I64)], inits)
    new, rec = convert(m)
    t = elem_types(new)
    resize = next(n for n in new.graph.node if n.op_type == "Resize")
    assert t[resize.input[0]] == F16 and t[resize.input[2]] == F32  # data converted, scales kept float32
    reshape = next(n for n in new.graph.node if n.op_type == "Reshape")
    assert t[reshape.input[1]] == I64 and reshape.input[1] == "shape"  # shape input untouched
    shape = next(n for n in new.graph.node if n.op_type == "Shape")
    assert t[shape.input[0]] == F16  # Shape reads the fp16 value directly, no Cast
    assert check_casts_at_boundaries(new) == 2 and t["s"] == I64 and t["y"] == F32
    feeds = random_inputs(m, seed=2)
    ref, out = run(m, feeds), run(new, feeds)
    assert np.array_equal(ref["s"], out["s"]) and rel_l2(ref["y"], out["y"]) < 1e-2


def clip_model(max_value):
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(max_value, np.float32), "hi"),
             numpy_helper.from_array(np.array(1e-9, np.float32), "eps")]
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip"),
             helper.make_node("Add", ["c", "eps"], ["y"], name="add_eps")]
    return make_model(nodes, [vi("x", [2, 5])], [vi("y", [2, 5])], inits)


def test_out_of_range_constants_are_clamped_with_a_warning():
    m = clip_model(3.4e38)
    new, rec = convert(m)
    consts = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    hi = next(v for k, v in consts.items() if k.startswith("hi_"))
    eps = next(v for k, v in consts.items() if k.startswith("eps_"))
    assert hi.dtype == np.float16 and float(hi) == FP16_MAX
    assert float(eps) == 2.0 ** -24  # would flush to zero: clamped to the smallest subnormal
    assert rec.stats["warn_clamped_constants"] == 2 and rec.stats["warn_clamped_values"] == 2
    feeds = random_inputs(m, seed=0)
    assert rel_l2(run(m, feeds)["y"], run(new, feeds)["y"]) < 1e-3


def test_out_of_range_keep_fp32_keeps_the_reading_op():
    new, rec = convert(clip_model(3.4e38), out_of_range="keep-fp32")
    assert rec.stats["kept_fp32_out_of_range"] == 2  # Clip (hi) and Add (eps)
    assert not rec.changed and ops(new) == ["Clip", "Add"]
    assert rec.stats["skipped_nothing_to_convert"] == 1


def test_constant_node_is_replaced_by_a_converted_initializer():
    nodes = [helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(np.float32(3.0))),
             helper.make_node("Mul", ["x", "k"], ["y"], name="mul")]
    m = make_model(nodes, [vi("x", [3])], [vi("y", [3])])
    new, rec = convert(m)
    assert ops(new) == ["Cast", "Mul", "Cast"]
    assert rec.stats["removed_constant_nodes"] == 1 and rec.stats["converted_constants"] == 1
    (k,) = new.graph.initializer
    assert k.data_type == F16 and float(numpy_helper.to_array(k)) == 3.0
    x = np.array([1, 2, 3], np.float32)
    np.testing.assert_array_equal(run(new, {"x": x})["y"], 3 * x)


def test_shared_initializer_gets_a_copy_for_the_fp16_reader():
    w = numpy_helper.from_array(np.array([0.5, 2.0, -1.0], np.float32), "w")
    nodes = [helper.make_node("Mul", ["x", "w"], ["m"], name="mul"),
             helper.make_node("Pow", ["m", "w"], ["y"], name="pow")]  # Pow is blocked: reads w in float32
    m = make_model(nodes, [vi("x", [3])], [vi("y", [3])], [w])
    new, rec = convert(m)
    types = {t.name: t.data_type for t in new.graph.initializer}
    assert types == {"w": F32, "w_fp16": F16}
    assert ops(new) == ["Cast", "Mul", "Cast", "Pow"]
    x = np.array([1.5, 0.25, 3.0], np.float32)
    np.testing.assert_allclose(run(new, {"x": x})["y"], run(m, {"x": x})["y"], rtol=1e-3)


def qdq_model():
    rng = np.random.default_rng(0)
    w = rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(np.float32(0.02), "s_x"), numpy_helper.from_array(np.int8(0), "z_x"),
             numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "s_w"),
             numpy_helper.from_array(np.zeros(4, np.int8), "z_w"),
             numpy_helper.from_array(np.float32(0.05), "s_r"), numpy_helper.from_array(np.int8(0), "z_r"),
             numpy_helper.from_array(np.array([1, 4, 64], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((1, 4, 64)).astype(np.float32), "bias2")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "s_x", "z_x"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["wd"], name="dq_w", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s_r", "z_r"], ["rq"], name="q_r"),
             helper.make_node("DequantizeLinear", ["rq", "s_r", "z_r"], ["rd"], name="dq_r"),
             helper.make_node("Reshape", ["rd", "shape"], ["rs"], name="reshape"),
             helper.make_node("Add", ["rs", "bias2"], ["a"], name="add"),
             helper.make_node("Tanh", ["a"], ["y"], name="tanh")]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 64])], inits, opset=17)


def test_qdq_parts_stay_float32_with_float32_scales():
    m = qdq_model()
    new, rec = convert(m)
    t = elem_types(new)
    for n in new.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert t[n.input[1]] == F32, n.name  # scales stay float32
    kept = {n.name for n in new.graph.node if all(t.get(o) != F16 for o in n.output) and n.op_type != "Cast"}
    # Conv reads DQ outputs, Relu feeds a Q, Reshape reads a DQ and Add reads it through the Reshape (data movement):
    # the quantized part stays float32; Tanh is past it and converts
    assert {"q_x", "dq_x", "dq_w", "conv", "relu", "q_r", "dq_r", "reshape", "add"} <= kept
    assert rec.stats["kept_fp32_qdq"] == 9 and rec.stats["converted_nodes"] == 1
    assert ops(new) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv", "Relu", "QuantizeLinear",
                        "DequantizeLinear", "Reshape", "Add", "Cast", "Tanh", "Cast"]
    check_casts_at_boundaries(new)
    feeds = random_inputs(m, seed=3)
    assert rel_l2(run(m, feeds)["y"], run(new, feeds)["y"]) < 1e-2


def test_integer_graph_is_left_alone():
    nodes = [helper.make_node("Add", ["a", "a"], ["y"], name="add")]
    m = make_model(nodes, [vi("a", [3], I64)], [vi("y", [3], I64)])
    new, rec = convert(m)
    assert not rec.changed and rec.stats == {"skipped_no_float32": 1}


def test_bf16_converts_what_the_opset_allows():
    new, rec = convert(conv_softmax(), to="bf16")
    t = elem_types(new)
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    relu = next(n for n in new.graph.node if n.op_type == "Relu")
    # opset 17's Conv has no bfloat16 variant: it stays float32; Relu (opset 14) runs in bfloat16
    assert t[conv.output[0]] == F32 and t[relu.output[0]] == BF16
    assert rec.stats["kept_fp32_no_bf16_type"] == 1 and rec.stats["kept_fp32_block_ops"] == 1
    assert ops(new) == ["Conv", "Cast", "Relu", "Cast", "Softmax"]
    check_casts_at_boundaries(new, low=BF16)


# -- real models ---------------------------------------------------------------------------------------------------

def test_digits_fp16_keeps_every_test_prediction():
    m = load(ROOT / "models" / "digits_resnet.onnx")
    data = np.load(ROOT / "models" / "digits.npz")
    new, rec = convert(m)
    assert ops(new).count("Cast") == 2  # input and output only
    check_casts_at_boundaries(new)
    x = data["test_input"]
    ref, out = run(m, {"input": x})["logits"], run(new, {"input": x})["logits"]
    assert rel_l2(ref, out) < 1e-2
    assert np.array_equal(ref.argmax(1), out.argmax(1))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv2", "yolo", "unet"])
def test_zoo_fp16_rel_l2_below_1e_2(name):
    from models.zoo import ZOO

    m = ZOO[name](batch=1, height=64, width=64, seed=0)
    new, rec = convert(m)
    n_io = len(m.graph.input) + len(m.graph.output)
    assert ops(new).count("Cast") == n_io  # casts only at the float32 graph inputs/outputs
    check_casts_at_boundaries(new)
    assert rec.stats["converted_nodes"] == len(m.graph.node)  # no op of these models is on the block list
    feeds = random_inputs(m, seed=0)
    ref, out = run(session(m), feeds), run(session(new), feeds)
    for k in ref:
        assert rel_l2(ref[k], out[k]) <= 1e-2, k
