"""Small builders shared by the tests (tiny graphs made with onnx.helper)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def vi(name, shape, elem=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def make_model(nodes, inputs, outputs, inits=(), opset=17, name="g") -> onnx.ModelProto:
    """A checked model of ``nodes`` (default-domain opset ``opset``; IR version 8, or 10 above opset 17).

    When a graph output is given without a shape (``vi(name, None)``), the outputs get the shapes strict shape
    inference gives; intermediate value_info is not kept (real exports rarely carry it, and passes must not depend on
    it).
    """
    g = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset <= 17 else 10
    if any(not o.type.tensor_type.HasField("shape") for o in m.graph.output):
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        m.graph.ClearField("output")
        m.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(m)
    return m


def conv_bn_relu_model(seed: int = 0, opset: int = 17, channels: int = 4) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(3->C, 3x3, pad 1) -> BatchNormalization -> Relu -> y."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    g = helper.make_graph(
        nodes, "conv_bn_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def relu_model(shape=(2, 3), dynamic_batch: bool = False) -> onnx.ModelProto:
    dims = ["N", *shape[1:]] if dynamic_batch else list(shape)
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m
