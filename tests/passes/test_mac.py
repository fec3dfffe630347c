"""Tests of the ``mac`` analysis pass: report in ctx.artifacts, stats, graph untouched, dynamic shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.analysis import Analysis, analyze, summarize
from onnxopt.errors import PreconditionError
from onnxopt.graphutil import fingerprint
from onnxopt.pass_base import PassContext
from onnxopt.pass_manager import PassManager
from onnxopt.passes.mac import Mac
from onnxopt.registry import load_registry


def conv_model(dynamic: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[N,3,16,16] -> Conv(3->8, 3x3, pad 1, bias) -> BN -> Relu -> Conv(8->4, 1x1) -> y."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "var"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    n = "N" if dynamic else 1
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, 4, 16, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_registered():
    reg = load_registry(plugins=False)
    assert reg.get("mac") is Mac and Mac.kind == "analysis"


def test_report_and_stats():
    m = conv_model()
    ctx = PassContext()
    new, record = PassManager([Mac(top=1)], summarize=summarize).run(m, ctx)
    rec = record.passes[0]
    assert rec.changed is False and new is m
    a = ctx.artifacts["mac"]
    assert isinstance(a, Analysis)
    conv1 = 16 * 16 * 8 * 3 * 3 * 3
    conv2 = 16 * 16 * 4 * 8
    assert a.macs == conv1 + conv2
    assert rec.stats["macs"] == conv1 + conv2
    assert rec.stats["params"] == 8 * 27 + 8 + 2 * 8 + 4 * 8  # conv1 W+b, BN scale+shift, conv2 W
    assert rec.stats["buffers"] == 2 * 8
    assert rec.stats["flops"] == 16 * 16 * 8 * (1 + 2 + 1)  # conv1 bias, BN, Relu
    assert rec.stats["top_layers"] == f"conv1={conv1}"
    assert rec.stats["peak_node"] == a.peak.node
    assert rec.before["macs"] == rec.after["macs"] == conv1 + conv2
    # the same numbers as analysing the model directly
    assert analyze(m).to_dict()["totals"] == a.to_dict()["totals"]


def test_graph_is_untouched():
    m = conv_model()
    graph = gs.import_onnx(m)
    before = fingerprint(graph)
    ctx = PassContext()
    ctx.template = m
    result = Mac().run(graph, ctx)
    assert result.changed is False
    assert fingerprint(graph) == before


def test_dynamic_input_needs_shape():
    m = conv_model(dynamic=True)
    with pytest.raises(PreconditionError, match=r"dynamic input dims: x\['N', 3, 16, 16\].*--input-shape"):
        PassManager([Mac()]).run(m, PassContext())
    ctx = PassContext(input_shapes={"x": (2, 3, 16, 16)})
    _, record = PassManager([Mac()], summarize=summarize).run(m, ctx)
    assert record.passes[0].stats["macs"] == 2 * (16 * 16 * 8 * 27 + 16 * 16 * 4 * 8)
    assert record.before["macs"] == record.passes[0].stats["macs"]


def test_after_fold_bn_params_change_as_expected():
    """Folding BN moves scale/shift into the conv: params drop by 2*C, buffers by 2*C (NOTES.md)."""
    from onnxopt.passes.fold_bn import FoldBatchNorm

    ctx = PassContext()
    _, record = PassManager([FoldBatchNorm(), Mac()], summarize=summarize).run(conv_model(), ctx)
    fold, mac = record.passes
    assert fold.changed and fold.before["params"] - fold.after["params"] == 2 * 8
    assert mac.stats["params"] == fold.after["params"] and mac.stats["buffers"] == 0
    assert fold.before["macs"] == fold.after["macs"]  # BN is not a MAC
