"""Small helpers over onnx-graphsurgeon graphs shared by the passes."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues


def _values(constant: gs.Constant) -> np.ndarray:
    """A gs.Constant's array, read WITHOUT changing the graph.

    graphsurgeon's ``.values`` replaces a lazily loaded value by the loaded array on first access, which
    :func:`fingerprint` (arrays compared by identity) would see as a changed weight. Lazy values are converted here
    without being stored; the result is then read-only (weights are replaced, never edited in place).
    """
    lazy = constant._values
    if isinstance(lazy, LazyValues) and isinstance(lazy.tensor, onnx.TensorProto):
        return onnx.numpy_helper.to_array(lazy.tensor)
    return constant.values


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor: an initializer, or the output of a ``Constant`` node. None otherwise.

    Paddle and TensorFlow exports often hold weights in ``Constant`` nodes; passes treat those like initializers.
    Reading does not change the graph (see :func:`_values`); the array may be read-only: never edit it in place.
    """
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return _values(tensor)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        node = tensor.inputs[0]
        attrs = node.attrs
        if "value" in attrs and isinstance(attrs["value"], gs.Constant):
            return _values(attrs["value"])
        for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
            if key in attrs:
                return np.array(attrs[key], dtype=dtype)
        for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
            if key in attrs:
                return np.array(list(attrs[key]), dtype=dtype)
    return None


def is_constant(tensor: gs.Tensor | None) -> bool:
    """True for an initializer or a ``Constant`` node's output (without loading lazy values)."""
    if tensor is None:
        return False
    return isinstance(tensor, gs.Constant) or constant_producer(tensor) is not None


def constant_producer(tensor: gs.Tensor) -> gs.Node | None:
    """The ``Constant`` node producing ``tensor``, if any."""
    if not isinstance(tensor, gs.Constant) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        return tensor.inputs[0]
    return None


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or else the first of ``base_1``, ``base_2``, ... not in ``taken``; the name is added to ``taken``.
    For any set of used names (a graphsurgeon graph's: :func:`unique_name`; an ONNX proto's: build the set)."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def unique_name(graph: gs.Graph, base: str, taken: set[str] | None = None) -> str:
    """A tensor/node name not used in ``graph`` (and not in ``taken``), derived from ``base``."""
    used = taken if taken is not None else set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    return fresh_name(base, used)


def _attr_key(value: Any) -> Any:
    if isinstance(value, gs.Constant):
        return ("const", id(value._values), value.dtype.__str__() if value.dtype is not None else None)
    if isinstance(value, gs.Tensor):
        return ("tensor", value.name)
    if isinstance(value, gs.Graph):
        return ("graph", fingerprint(value))
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    return repr(value)


def fingerprint(graph: gs.Graph) -> str:
    """A digest of the graph's structure and of the identity of its constant values.

    It changes when nodes, their order, attributes, connections, graph inputs/outputs or constant arrays change.
    Constant arrays are compared by identity (passes replace weights rather than editing them in place), which keeps
    the digest cheap for models with hundreds of megabytes of weights.
    """
    h = hashlib.blake2b(digest_size=16)
    parts: list[Any] = []
    for t in graph.inputs:
        parts.append(("in", t.name, str(t.dtype), tuple(t.shape) if t.shape is not None else None))
    for t in graph.outputs:
        parts.append(("out", t.name, str(t.dtype), tuple(t.shape) if t.shape is not None else None))
    for n in graph.nodes:
        parts.append(
            (
                "node", n.op, n.domain, n.name,
                tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs),
                tuple(sorted((k, _attr_key(v)) for k, v in n.attrs.items())),
            )
        )
    for name, t in sorted(graph.tensors().items()):
        if isinstance(t, gs.Constant):
            parts.append(("const", name, id(t._values), tuple(t.shape), str(t.dtype)))
        elif t.shape is not None or t.dtype is not None:
            parts.append(("var", name, str(t.dtype), tuple(t.shape) if t.shape is not None else None))
    h.update(repr(parts).encode())
    return h.hexdigest()
