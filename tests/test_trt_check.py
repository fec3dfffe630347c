"""trt-check: TensorRT's ONNX parser rules checked without TensorRT (exact finding codes, nodes, severities, exit codes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.backends.base import parse_profiles
from onnxopt.cli import main
from onnxopt.model import load
from onnxopt.trt_check import SUPPORTED_OPS, UNSUPPORTED_OPS, check

ROOT = Path(__file__).resolve().parents[1]
F32, I8, U8, I64 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT64


def invoke(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def make_model(nodes, inputs, outputs, inits=(), opset=17, domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    m = helper.make_model(g, opset_imports=imports)
    m.ir_version = 8
    return m


def vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def codes(findings):
    return [(f.code, f.severity, f.node, f.op) for f in findings]


def qdq_conv(*, zp_x=0, zp_type=I8, act_scale=None, w_scale=None):
    """x -> Q -> DQ -> Conv(DQ(int8 weight)) -> y, with the given activation zero point / type and scales."""
    rng = np.random.default_rng(0)
    zp_np = {I8: np.int8, U8: np.uint8}[zp_type]
    act_scale = np.float32(0.02) if act_scale is None else act_scale
    w_scale = np.full(4, 0.01, np.float32) if w_scale is None else w_scale
    inits = [
        numpy_helper.from_array(np.asarray(act_scale, np.float32), "s_x"),
        numpy_helper.from_array(np.full(np.shape(act_scale), zp_x, zp_np), "z_x"),
        numpy_helper.from_array(rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), "w_q"),
        numpy_helper.from_array(w_scale, "s_w"),
        numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), "z_w"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "s_x", "z_x"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["wd"], name="dq_w", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])], inits)


# -- clean models --------------------------------------------------------------------------------------------------

def test_clean_qdq_model_has_no_findings():
    assert check(qdq_conv()) == []


def test_digits_model_is_clean_with_a_profile():
    m = load(ROOT / "models" / "digits_resnet.onnx")
    assert check(m, parse_profiles(["input=1x1x32x32:8x1x32x32:64x1x32x32"])) == []


def test_the_op_table_is_consistent():
    assert not SUPPORTED_OPS & UNSUPPORTED_OPS
    assert {"Conv", "QuantizeLinear", "DequantizeLinear", "Resize", "LayerNormalization"} <= SUPPORTED_OPS


# -- the three findings the issue names ----------------------------------------------------------------------------

def test_nonzero_zero_point():
    assert codes(check(qdq_conv(zp_x=3))) == [("QDQ_ZERO_POINT", "error", "q_x", "QuantizeLinear"),
                                              ("QDQ_ZERO_POINT", "error", "dq_x", "DequantizeLinear")]


def test_unsupported_op():
    nodes = [helper.make_node("Unique", ["x"], ["y"], name="uniq")]
    m = make_model(nodes, [vi("x", [5])], [vi("y", None)])
    f = check(m)
    assert codes(f) == [("UNSUPPORTED_OP", "error", "uniq", "Unique")]
    assert "not supported by TensorRT's ONNX parser" in f[0].message


def test_dynamic_dim_without_profile():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    m = make_model(nodes, [vi("x", ["N", 3])], [vi("y", ["N", 3])])
    f = check(m)
    assert codes(f) == [("DYNAMIC_NO_PROFILE", "error", "x", "(input)")]
    assert "--input-shape x=MIN:OPT:MAX" in f[0].message
    assert check(m, parse_profiles(["x=1x3:4x3:16x3"])) == []
    assert codes(check(m, parse_profiles(["x=1x4:4x4:16x4"]))) == [("PROFILE_MISMATCH", "error", "x", "(input)")]
    assert codes(check(m, parse_profiles(["x=1x3", "z=1x3"]))) == [("UNKNOWN_INPUT", "error", "z", "(input)")]


# -- more rules ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(zp_type=U8), [("QDQ_TYPE", "q_x"), ("QDQ_TYPE", "dq_x")]),
        (dict(act_scale=np.full(3, 0.02, np.float32)),
         [("QDQ_PER_CHANNEL_ACTIVATION", "q_x"), ("QDQ_PER_CHANNEL_ACTIVATION", "dq_x")]),
        (dict(w_scale=np.full(5, 0.01, np.float32)), [("QDQ_SCALE_SHAPE", "dq_w")]),
        (dict(w_scale=np.full((4, 1), 0.01, np.float32)), [("QDQ_SCALE_SHAPE", "dq_w")]),
        (dict(act_scale=np.float32(-0.5)), [("QDQ_SCALE_VALUE", "q_x"), ("QDQ_SCALE_VALUE", "dq_x")]),
    ],
    ids=["uint8", "per-channel-activation", "scale-length", "scale-rank", "negative-scale"],
)
def test_qdq_rules(kwargs, expected):
    f = check(qdq_conv(**kwargs))
    assert [(x.code, x.node) for x in f] == expected
    assert all(x.severity == "error" for x in f)


def test_attribute_restrictions_and_custom_ops():
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p", "idx"], name="pool", kernel_shape=[2, 2]),
        helper.make_node("Resize", ["p", "", "sc"], ["r"], name="resize", mode="linear",
                         coordinate_transformation_mode="tf_crop_and_resize"),
        helper.make_node("MyOp", ["r"], ["y"], name="custom", domain="my.ops"),
    ]
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")]
    m = make_model(nodes, [vi("x", [1, 1, 4, 4])], [vi("y", None), vi("idx", None, I64)], inits, domains=["my.ops"])
    f = check(m)
    assert [(x.code, x.node, x.severity) for x in f] == [
        ("UNSUPPORTED_ATTR", "pool", "error"), ("UNSUPPORTED_ATTR", "resize", "error"),
        ("CUSTOM_OP", "custom", "error"), ("INT64_CAST", "(graph)", "warning")]
    assert "Indices" in f[0].message and "tf_crop_and_resize" in f[1].message


def test_int64_warnings():
    big = numpy_helper.from_array(np.array([2 ** 40], np.int64), "big")
    ends = numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "ends")
    starts = numpy_helper.from_array(np.array([0], np.int64), "starts")
    nodes = [helper.make_node("Add", ["i", "big"], ["y"], name="add_big"),
             helper.make_node("Slice", ["x", "starts", "ends"], ["s"], name="slice_all")]
    m = make_model(nodes, [vi("i", [1], I64), vi("x", [4])], [vi("y", [1], I64), vi("s", [4])], [big, ends, starts])
    f = check(m)
    # INT64_MAX as a Slice end means "to the end" and is not reported; 2**40 is
    assert [(x.code, x.node, x.severity) for x in f] == [
        ("INT64_RANGE", "add_big", "warning"), ("INT64_CAST", "(graph)", "warning")]
    assert f[1].message.startswith("5 INT64 tensor(s)")  # i, y, big, ends, starts


def test_unsupported_io_type():
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="id")]
    m = make_model(nodes, [vi("x", [2], TensorProto.DOUBLE)], [vi("y", [2], TensorProto.DOUBLE)])
    assert [(x.code, x.node) for x in check(m)] == [("UNSUPPORTED_TYPE", "x"), ("UNSUPPORTED_TYPE", "y")]


# -- the command ---------------------------------------------------------------------------------------------------

def test_cli_exit_codes_and_json(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    onnx.save(qdq_conv(zp_x=3), bad)
    good = tmp_path / "good.onnx"
    onnx.save(qdq_conv(), good)
    code, out, err = invoke(["trt-check", good], capsys)
    assert code == 0 and "0 errors, 0 warnings" in err
    report = tmp_path / "f.json"
    code, out, err = invoke(["trt-check", bad, "--json", report], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("onnxopt: error: trt-check: 2 errors, 0 warnings")
    data = json.loads(report.read_text())
    assert [f["code"] for f in data["findings"]] == ["QDQ_ZERO_POINT", "QDQ_ZERO_POINT"]
    code, out, err = invoke(["trt-check", good, "--input-shape", "x=1x3x8x8:2x3x8x8"], capsys)
    assert code == 2 and "give one shape or three (min:opt:max), not 2" in err and "Traceback" not in err
