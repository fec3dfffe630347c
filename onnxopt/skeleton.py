"""A weight-stripped copy of a model for fast shape inference and structure checks.

ONNX shape inference (and the checker) take a serialized model: on a 100 MB model most of the time goes into
serializing the weights, copying them into C++ and parsing the inferred model back. Shapes do not depend on the values
of large float weights, only on their types and dims, so :class:`Skeleton` builds a copy of the graph in which every
large tensor is replaced by a graph input of the same type and shape:

* initializers with more than :data:`STRIP_ELEMENTS` elements (or over 4 KiB), and ``Constant`` nodes whose ``value``
  is that large, become typed graph inputs;
* integer tensors (int32/int64) are never stripped, whatever their size: they are the ones whose *values* shape
  inference reads (Reshape shapes, Resize sizes, Slice starts/ends, Split sizes, Expand/Tile/ConstantOfShape targets);
  float tensors whose values matter (Resize ``scales``) hold one number per axis and stay under the limit.

Inference on the skeleton therefore gives exactly the shapes inference on the full model gives (the tests compare the
two on the zoo models), in a few milliseconds instead of most of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxopt.errors import ModelLoadError

#: Tensors with more elements than this are replaced by typed graph inputs in the skeleton.
STRIP_ELEMENTS = 1024

#: Element types never stripped: their values may define shapes.
_KEEP_TYPES = frozenset({TensorProto.INT64, TensorProto.INT32})

#: Bits per element of the sub-byte types (packed two per byte); others use the numpy itemsize.
_SUB_BYTE_BITS = {
    getattr(TensorProto, n): 4 for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)
}

Dim = int | str | None
Shape = tuple[Dim, ...]


def element_bits(elem_type: int) -> int | None:
    """Bits per element of an ONNX element type (None for strings and unknown types)."""
    if elem_type in _SUB_BYTE_BITS:
        return _SUB_BYTE_BITS[elem_type]
    if elem_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize * 8
    except (KeyError, TypeError, ValueError):
        return None


def numel(shape: Shape | None) -> int | None:
    """Number of elements of a static shape; None when a dim is unknown."""
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return math.prod(shape)


def nbytes(elem_type: int, shape: Shape | None) -> int | None:
    """Bytes of a dense tensor (sub-byte types packed); None when the shape or the type size is unknown."""
    n, bits = numel(shape), element_bits(elem_type)
    if n is None or bits is None:
        return None
    return (n * bits + 7) // 8


@dataclass(frozen=True)
class ConstInfo:
    """A constant tensor of the main graph: an initializer or the output of a ``Constant`` node."""

    name: str
    elem_type: int
    dims: tuple[int, ...]
    kind: str  # "initializer" | "constant-node"

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int:
        return nbytes(self.elem_type, self.dims) or 0

    @property
    def is_float(self) -> bool:
        return self.elem_type in (
            TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE,
        )


def _constant_node_info(node: onnx.NodeProto) -> tuple[int, tuple[int, ...], onnx.TensorProto | None] | None:
    for a in node.attribute:
        if a.name == "value":
            return a.t.data_type, tuple(a.t.dims), a.t
        if a.name == "sparse_value":
            return a.sparse_tensor.values.data_type, tuple(a.sparse_tensor.dims), None
        if a.name == "value_float":
            return TensorProto.FLOAT, (), None
        if a.name == "value_floats":
            return TensorProto.FLOAT, (len(a.floats),), None
        if a.name == "value_int":
            return TensorProto.INT64, (), None
        if a.name == "value_ints":
            return TensorProto.INT64, (len(a.ints),), None
        if a.name == "value_string":
            return TensorProto.STRING, (), None
        if a.name == "value_strings":
            return TensorProto.STRING, (len(a.strings),), None
    return None


def _strip(elem_type: int, dims: tuple[int, ...]) -> bool:
    if elem_type in _KEEP_TYPES:
        return False
    n = math.prod(dims)
    # Also strip what onnxopt.model.graph_skeleton stubs (over 4 KiB): its data no longer matches its dims.
    return n > STRIP_ELEMENTS or (nbytes(elem_type, dims) or 0) > 4096


class Skeleton:
    """A copy of ``model``'s main graph without its large tensors (see the module docstring).

    Attributes:
        model: the skeleton model (small; safe to edit: input shapes, small constants).
        constants: every constant of the original main graph (initializers and Constant-node outputs) by name.
        stripped: names of the tensors replaced by graph inputs.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        src = model.graph
        skel = onnx.ModelProto()
        skel.ir_version = model.ir_version
        skel.opset_import.extend(model.opset_import)
        skel.functions.extend(model.functions)
        g = skel.graph
        g.name = src.name
        self.constants: dict[str, ConstInfo] = {}
        self._originals: dict[str, onnx.TensorProto] = {}
        stripped: list[onnx.ValueInfoProto] = []
        input_names = {vi.name for vi in src.input}
        for node in src.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                info = _constant_node_info(node)
                if info is not None:
                    elem_type, dims, tensor = info
                    self.constants[node.output[0]] = ConstInfo(node.output[0], elem_type, dims, "constant-node")
                    if tensor is not None and _strip(elem_type, dims):
                        self._originals[node.output[0]] = tensor
                        stripped.append(helper.make_tensor_value_info(node.output[0], elem_type, list(dims)))
                        continue
            g.node.append(node)
        for t in src.initializer:
            dims = tuple(t.dims)
            self.constants[t.name] = ConstInfo(t.name, t.data_type, dims, "initializer")
            if _strip(t.data_type, dims):
                self._originals[t.name] = t
                if t.name not in input_names:
                    stripped.append(helper.make_tensor_value_info(t.name, t.data_type, list(dims)))
            else:
                g.initializer.append(t)
        g.sparse_initializer.extend(src.sparse_initializer)
        g.input.extend(src.input)
        g.input.extend(stripped)
        g.output.extend(src.output)
        g.value_info.extend(src.value_info)
        self.model = skel
        self.stripped = frozenset(self._originals)

    # -- editing ----------------------------------------------------------------------------------------------------
    def set_input_shapes(self, shapes: dict[str, tuple[Dim, ...]]) -> None:
        """Give graph inputs new dims (ints, or strings for symbolic dims)."""
        for vi in self.model.graph.input:
            if vi.name in shapes:
                shape = vi.type.tensor_type.shape
                shape.ClearField("dim")
                for d in shapes[vi.name]:
                    dim = shape.dim.add()
                    if isinstance(d, int):
                        dim.dim_value = d
                    elif d:
                        dim.dim_param = d

    def clear_inferred(self) -> None:
        """Drop value_info and the dims of graph outputs (before re-inferring after an input shape change)."""
        g = self.model.graph
        g.ClearField("value_info")
        for vi in g.output:
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")

    def inputs_model(self) -> onnx.ModelProto:
        """A model holding only the real graph inputs (not the stripped tensors), for input-shape resolution."""
        m = onnx.ModelProto()
        m.graph.input.extend(vi for vi in self.model.graph.input if vi.name not in self.constants)
        return m

    def initializer(self, name: str) -> onnx.TensorProto | None:
        """The skeleton's (small, kept) initializer called ``name``."""
        for t in self.model.graph.initializer:
            if t.name == name:
                return t
        return None

    # -- checks and inference ---------------------------------------------------------------------------------------
    def check(self) -> None:
        """The ONNX checker on the skeleton, plus data-size checks of the stripped tensors. Raises ModelLoadError."""
        try:
            onnx.checker.check_model(self.model)
        except Exception as e:  # noqa: BLE001 - onnx raises several types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"ONNX checker failed: {first}") from e
        for name, t in self._originals.items():
            n = math.prod(t.dims)
            if t.data_location == TensorProto.EXTERNAL:
                continue  # sizes were checked when the external data was loaded
            if t.HasField("raw_data") or not _typed_count(t):
                want = nbytes(t.data_type, tuple(t.dims))
                if want is not None and len(t.raw_data) != want:
                    raise ModelLoadError(
                        f"tensor {name!r}: {len(t.raw_data)} bytes of data for shape {list(t.dims)} (expected {want})"
                    )
            elif _typed_count(t) != n and t.data_type not in _SUB_BYTE_BITS:
                raise ModelLoadError(f"tensor {name!r}: {_typed_count(t)} values for shape {list(t.dims)}")

    def infer(self, *, strict: bool = False) -> onnx.ModelProto:
        """ONNX shape inference (with data propagation) on the skeleton; returns the inferred skeleton."""
        return onnx.shape_inference.infer_shapes(self.model, check_type=True, strict_mode=strict, data_prop=True)


def _typed_count(t: onnx.TensorProto) -> int:
    return max(len(t.float_data), len(t.int32_data), len(t.int64_data), len(t.double_data), len(t.uint64_data))


def value_types(model: onnx.ModelProto) -> dict[str, tuple[int, Shape | None]]:
    """``name -> (elem_type, shape)`` of every value an (inferred) model declares; shape None when unknown."""
    out: dict[str, tuple[int, Shape | None]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        shape: Shape | None = None
        if tt.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
            )
        prev = out.get(vi.name)
        if prev is None or (prev[1] is None and shape is not None) or not prev[0]:
            out[vi.name] = (tt.elem_type or (prev[0] if prev else 0), shape)
    for t in g.initializer:
        out[t.name] = (t.data_type, tuple(t.dims))
    return out
