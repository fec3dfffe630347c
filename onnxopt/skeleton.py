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
import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxopt.errors import ModelLoadError, first_line
from onnxopt.model import _iter_tensors, check_parsed, len_field, model_file, parse_error

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

    def __init__(self, model: onnx.ModelProto, payloads: dict[str, tuple[str, int]] | None = None) -> None:
        """``payloads``: sizes of data already dropped by :func:`read_structure` (checked by :meth:`check`)."""
        self._payloads = dict(payloads or {})
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
            first = first_line(e)
            raise ModelLoadError(f"ONNX checker failed: {first}") from e
        for name, t in self._originals.items():
            if t.data_location == TensorProto.EXTERNAL:
                continue  # sizes were checked when the external data was located
            if name in self._payloads:
                kind, size = self._payloads[name]
            elif t.HasField("raw_data") or not _typed_count(t):
                kind, size = "raw", len(t.raw_data)
            else:
                kind, size = "count", _typed_count(t)
            want = nbytes(t.data_type, tuple(t.dims)) if kind == "raw" else math.prod(t.dims)
            if kind == "raw" and want is not None and size != want:
                raise ModelLoadError(
                    f"tensor {name!r}: {size} bytes of data for shape {list(t.dims)} (expected {want})"
                )
            if kind == "count" and size != want and t.data_type not in _SUB_BYTE_BITS:
                raise ModelLoadError(f"tensor {name!r}: {size} values for shape {list(t.dims)} (expected {want})")

    def infer(self, *, strict: bool = False) -> onnx.ModelProto:
        """ONNX shape inference (with data propagation) on the skeleton; returns the inferred skeleton."""
        from onnxopt.shapes import infer_shapes

        return infer_shapes(self.model, strict=strict)


def _typed_count(t: onnx.TensorProto) -> int:
    return max(len(t.float_data), len(t.int32_data), len(t.int64_data), len(t.double_data), len(t.uint64_data))


def typed_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, Shape | None]]:
    """``name -> (elem_type, shape)`` of every value an (inferred) model declares; shape None when unknown.
    (:func:`onnxopt.shapes.value_shapes` and :func:`onnxopt.shapes.value_types` give the two halves separately.)"""
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


# ---------------------------------------------------------------------------------------------------------------------
# Reading a model file without its weights

#: TensorProto fields that hold the data: raw_data, float_data, int32_data, int64_data, double_data, uint64_data.
_PAYLOAD_FIELDS = {9: "raw", 4: "f32", 5: "varint", 7: "varint", 10: "f64", 11: "varint"}


class _Wire:
    """A minimal reader of the protobuf wire format over a buffer (tags, varints, length-delimited fields)."""

    def __init__(self, buf) -> None:
        self.buf = buf

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        result = shift = 0
        buf = self.buf
        while True:
            if pos >= end:
                raise ValueError("truncated varint")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result, pos
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def fields(self, start: int, end: int):
        """Yield ``(field, wire_type, field_start, value_start, value_end)`` of the message in ``buf[start:end]``."""
        pos = start
        while pos < end:
            field_start = pos
            tag, pos = self.varint(pos, end)
            field, wt = tag >> 3, tag & 7
            if wt == 0:
                _, vend = self.varint(pos, end)
                vstart = pos
            elif wt == 2:
                n, vstart = self.varint(pos, end)
                vend = vstart + n
            elif wt == 1:
                vstart, vend = pos, pos + 8
            elif wt == 5:
                vstart, vend = pos, pos + 4
            else:
                raise ValueError(f"unsupported wire type {wt}")
            if vend > end or field == 0:
                raise ValueError("truncated or corrupt message")
            yield field, wt, field_start, vstart, vend
            pos = vend


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: tag, length, payload."""
    return len_field(number, len(payload)) + payload


def _tensor_without_payload(w: _Wire, start: int, end: int) -> tuple[bytes, str, tuple[str, int]] | None:
    """The TensorProto in ``buf[start:end]`` without its data fields, its name and (payload kind, bytes), when
    :class:`Skeleton` would strip it (see ``_strip``); None to keep the tensor as it is."""
    dims: list[int] = []
    data_type = 0
    name = ""
    payload: tuple[str, int] | None = None
    kept: list[tuple[int, int]] = []
    for field, wt, fstart, vstart, vend in w.fields(start, end):
        if field in _PAYLOAD_FIELDS and wt == 2:  # packed (ONNX declares them packed) or raw bytes
            kind, size = _PAYLOAD_FIELDS[field], vend - vstart
            if kind == "f32":
                size //= 4
            elif kind == "f64":
                size //= 8
            elif kind == "varint":  # one final byte (< 0x80) per value
                size = int(np.count_nonzero(np.frombuffer(w.buf, np.uint8, size, vstart) < 0x80))
            payload = ("raw" if kind == "raw" else "count", size)
            continue
        kept.append((fstart, vend))
        if field == 1:
            if wt == 0:
                dims.append(w.varint(vstart, vend)[0])
            else:  # packed
                pos = vstart
                while pos < vend:
                    d, pos = w.varint(pos, vend)
                    dims.append(d)
        elif field == 2 and wt == 0:
            data_type = w.varint(vstart, vend)[0]
        elif field == 8 and wt == 2:
            name = bytes(w.buf[vstart:vend]).decode("utf-8", "replace")
    if payload is None or not _strip(data_type, tuple(dims)):
        return None
    return b"".join(bytes(w.buf[a:b]) for a, b in kept), name, payload


def read_structure(path) -> tuple[onnx.ModelProto, dict[str, tuple[str, int]]]:
    """The model in ``path`` WITHOUT the data of its large initializers (those :class:`Skeleton` strips), and the size
    of each dropped payload: ``name -> ("raw", bytes)`` or ``name -> ("count", values)`` (typed data fields).

    The file is memory-mapped and walked at the wire level; the dropped payloads are never read or copied, so the
    analysis of a 100 MB model starts in milliseconds. Raises :class:`ModelLoadError` for files that are not ONNX.
    """
    import mmap

    p = model_file(path)
    try:
        with open(p, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ModelLoadError(f"{p}: file is empty")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelLoadError(f"{p}: cannot read: {e.strerror or e}") from e
    payloads: dict[str, tuple[str, int]] = {}
    try:
        w = _Wire(buf)
        out = bytearray()
        for field, wt, fstart, vstart, vend in w.fields(0, len(buf)):
            if field != 7 or wt != 2:  # everything but the graph, verbatim
                out += buf[fstart:vend]
                continue
            graph = bytearray()
            for gfield, gwt, gstart, gvstart, gvend in w.fields(vstart, vend):
                stripped = _tensor_without_payload(w, gvstart, gvend) if gfield == 5 and gwt == 2 else None
                if stripped is None:
                    graph += buf[gstart:gvend]
                else:
                    tensor, name, payload = stripped
                    payloads[name] = payload
                    graph += _field(5, tensor)
            out += _field(7, bytes(graph))
        model = onnx.ModelProto()
        model.ParseFromString(bytes(out))
    except Exception as e:  # noqa: BLE001 - the wire walk raises ValueError/IndexError, protobuf DecodeError and others
        raise parse_error(p, buf, e) from e
    finally:
        buf.close()
    if check_parsed(model, p):
        from onnx import external_data_helper

        # External tensors the skeleton keeps (small ones, integer ones: their values may define shapes) are loaded;
        # the large ones stay where they are (the skeleton replaces them by typed inputs).
        for t in _iter_tensors(model):
            if t.data_location == TensorProto.EXTERNAL and not _strip(t.data_type, tuple(t.dims)):
                try:
                    external_data_helper.load_external_data_for_tensor(t, str(p.parent))
                except Exception as e:  # noqa: BLE001
                    raise ModelLoadError(f"{p}: cannot load external data of {t.name!r}: {e}") from e
                t.data_location = TensorProto.DEFAULT
                del t.external_data[:]
    return model, payloads
