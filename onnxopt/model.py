"""Model I/O: load and save ONNX models safely.

* Loading checks the file, the protobuf, external-data locations (relative, inside the model's folder, present), the
  opset range and the ONNX checker, and turns every failure into a one-line :class:`ModelLoadError`.
* Saving is atomic: the model (and its external data, beside it) is written in a temporary folder next to the target
  and renamed into place, so an error never leaves a half-written file. The input file is never written to unless the
  caller asks for it explicitly.
* Models over 2 GB are saved with external data (protobuf cannot serialize more than 2 GB in one message).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxopt.errors import ModelLoadError, ModelSaveError, first_line

#: Opsets of the default domain we accept. The upper bound is what the installed onnx package knows.
MIN_OPSET = 7
MAX_OPSET = onnx.defs.onnx_opset_version()

#: Above this size a model is saved with external data and checked by path.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes, a margin under protobuf's 2 GiB limit


def _iter_tensors(model: onnx.ModelProto):
    return external_data_helper._get_all_tensors(model)  # initializers, Constant attributes, subgraphs


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held by the model (in memory or in external files)."""
    total = 0
    for t in _iter_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            total += int(info.get("length", 0) or 0)
        elif t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            total += t.ByteSize()
        else:  # from dims, without touching (or copying) the data
            n = 1
            for d in t.dims:
                n *= d
            total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _iter_tensors(model))


def _check_external_locations(model: onnx.ModelProto, base: Path) -> None:
    base_resolved = base.resolve()
    for t in _iter_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location")
        if not loc:
            raise ModelLoadError(f"tensor {t.name!r} has external data without a location")
        if os.path.isabs(loc) or Path(loc).is_absolute():
            raise ModelLoadError(f"tensor {t.name!r}: external data location {loc!r} is absolute; refused")
        target = (base / loc).resolve()
        if base_resolved not in target.parents:
            raise ModelLoadError(
                f"tensor {t.name!r}: external data location {loc!r} escapes the model's folder; refused"
            )
        if not target.is_file():
            raise ModelLoadError(f"tensor {t.name!r}: external data file {loc!r} not found next to the model")
        length = int(info.get("length", 0) or 0)
        offset = int(info.get("offset", 0) or 0)
        if length and offset + length > target.stat().st_size:
            raise ModelLoadError(
                f"tensor {t.name!r}: external data file {loc!r} is too short "
                f"(needs {offset + length} bytes, has {target.stat().st_size})"
            )


def check_opset(model: onnx.ModelProto) -> int:
    opset = default_opset(model)
    if opset is None:
        raise ModelLoadError("model imports no default-domain opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelLoadError(f"opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}")
    return opset


def model_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, if it names an existing file; else a :class:`ModelLoadError` (no such file, a folder)."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a folder, not an ONNX file")
    return p


def parse_error(p: Path, data, e: BaseException) -> ModelLoadError:
    """The error for a file whose bytes (``data``) do not parse. Every ONNX file starts with field 1 (ir_version,
    varint): tag byte 0x08. A file that starts like one but does not parse was cut short or damaged; anything else is
    not an ONNX file at all."""
    reason = "truncated or corrupt ONNX protobuf" if data[:1] == b"\x08" else "not an ONNX protobuf"
    return ModelLoadError(f"{p}: {reason} ({first_line(e)})")


def check_parsed(model: onnx.ModelProto, p: Path) -> bool:
    """What every model read from ``p`` must pass before use: an IR version and a graph, a supported opset, external
    data locations inside the model's folder. Returns whether the model has external data."""
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelLoadError(f"{p}: not an ONNX model (no IR version or no graph)")
    check_opset(model)
    external = has_external_data(model)
    if external:
        _check_external_locations(model, p.parent)
    return external


def load(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model with its external data, checking it on the way. Raises :class:`ModelLoadError`."""
    p = model_file(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ModelLoadError(f"{p}: cannot read: {e.strerror or e}") from e
    if not data:
        raise ModelLoadError(f"{p}: file is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as e:
        raise parse_error(p, data, e) from e
    except Exception as e:  # noqa: BLE001 - protobuf raises several types on garbage
        raise ModelLoadError(f"{p}: not an ONNX protobuf ({first_line(e)})") from e
    external = check_parsed(model, p)
    if check:
        try:
            # With external data, by path: checks the data where it lies and works for models over 2 GB.
            # Otherwise on the bytes already read (no second read, no re-serialization).
            onnx.checker.check_model(str(p) if external else data)
        except Exception as e:  # onnx raises ValidationError and others
            raise ModelLoadError(f"{p}: ONNX checker failed: {first_line(e)}") from e
    del data
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{p}: cannot load external data: {first_line(e)}") from e
    return model


def check_model(model: onnx.ModelProto, *, full_check: bool = False) -> None:
    """Run the ONNX checker, by path through a temporary file when the model is too big for one message."""
    if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(model, full_check=full_check)
        return
    with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as d:
        path = Path(d) / "model.onnx"
        _write(model, path, external=True)
        onnx.checker.check_model(str(path), full_check=full_check)


def _write(model: onnx.ModelProto, path: Path, *, external: bool) -> None:
    if external:
        # convert_model_to_external_data mutates the proto: work on a copy so the caller's model keeps its data.
        m = onnx.ModelProto()
        m.CopyFrom(model)
        external_data_helper.convert_model_to_external_data(
            m, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024
        )
        onnx.save_model(m, str(path))
    else:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write ``model`` to ``path`` atomically.

    ``external_data``: None = only when the model is too large for one protobuf message. With external data the
    tensors go to ``<name>.data`` beside the model. ``protect``: paths that must never be overwritten (the input).
    """
    if external_data is None:
        external_data = tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    return atomic_output(path, lambda tmp: _write(model, tmp, external=bool(external_data)), protect=protect)


def model_to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


#: The model-level fields a rewritten model keeps from the original (with its metadata_props).
_HEADER_FIELDS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")


def _copy_header(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """Set ``dst``'s header fields and metadata to ``src``'s."""
    for field in _HEADER_FIELDS:
        setattr(dst, field, getattr(src, field))
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)


def graph_to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a graphsurgeon graph, keeping the header (IR version, producer, metadata, doc) of ``template``."""
    model = gs.export_onnx(graph, do_type_check=False)
    if template is not None:
        _copy_header(template, model)
        # Keep opsets the template imports but graphsurgeon dropped (it only lists those used).
        have = {imp.domain for imp in model.opset_import}
        for imp in template.opset_import:
            if imp.domain not in have:
                model.opset_import.append(imp)
        _initializer_inputs(model, template)
    return model


def _initializer_inputs(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """List initializers as graph inputs again where the original did (graphsurgeon drops them from the inputs):
    all of them below IR version 4, where the checker requires it; otherwise those the original listed (inputs with a
    default value), so the model's interface does not change. The defaults of such inputs, which the passes see as
    plain graph inputs (see :func:`unfreeze_overridable`), are put back as initializers."""
    listed = {vi.name for vi in template.graph.input} if template.HasField("graph") else set()
    have = {vi.name for vi in model.graph.input}
    for t in model.graph.initializer:
        if t.name not in have and (model.ir_version < 4 or t.name in listed):
            model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    inits = {t.name for t in model.graph.initializer}
    model.graph.initializer.extend(d for d in template.graph.initializer if d.name in have and d.name not in inits)


def overridable_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers that are also graph inputs from IR version 4 on: defaults a caller may override, so no pass may
    treat them as constants (fold them, merge them, or bake them into weights)."""
    if model.ir_version < 4:
        return []
    listed = {vi.name for vi in model.graph.input}
    return [t for t in model.graph.initializer if t.name in listed]


def header_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without its graph: what :func:`graph_to_model` needs as a template. It keeps the graph's
    input list (names, types, order) and the default values of overridable inputs."""
    header = onnx.ModelProto()
    _copy_header(model, header)
    header.opset_import.extend(model.opset_import)
    header.graph.input.extend(model.graph.input)
    header.graph.initializer.extend(overridable_initializers(model))
    return header


def freeze_overridable(template: onnx.ModelProto) -> None:
    """Make overridable initializers plain constants: drop them from the template's input list and defaults, so that
    exported models no longer list them as inputs (the model's interface changes; callers opt in)."""
    names = {t.name for t in template.graph.initializer}
    keep = [vi for vi in template.graph.input if vi.name not in names]
    del template.graph.input[:]
    template.graph.input.extend(keep)
    del template.graph.initializer[:]


def unfreeze_overridable(graph: gs.Graph, template: onnx.ModelProto) -> int:
    """Turn the constants that are overridable graph inputs (see :func:`overridable_initializers`) back into graph
    input variables, in the original input order, so that passes cannot fold them; :func:`graph_to_model` restores
    their default values. Returns how many were turned."""
    if not len(template.graph.initializer):
        return 0
    tensors = graph.tensors()
    turned: dict[str, gs.Variable] = {}
    for d in template.graph.initializer:
        name = d.name
        c = tensors.get(name)
        if c is None:  # unused: graphsurgeon dropped it on import, but it is part of the interface
            dtype = onnx.helper.tensor_dtype_to_np_dtype(d.data_type)
            turned[name] = gs.Variable(name, dtype=dtype, shape=list(d.dims))
            continue
        if not isinstance(c, gs.Constant):
            continue
        v = gs.Variable(name, dtype=c.dtype, shape=list(c.shape))
        for node in list(c.outputs):
            node.inputs = [v if t is c else t for t in node.inputs]
        graph.outputs = [v if t is c else t for t in graph.outputs]
        turned[name] = v
    if turned:
        order = {vi.name: i for i, vi in enumerate(template.graph.input)}
        graph.inputs = sorted([*graph.inputs, *turned.values()], key=lambda t: order.get(t.name, len(order)))
    return len(turned)


#: Constants larger than this are replaced by stubs in a skeleton.
SKELETON_STUB_BYTES = 4096


@contextlib.contextmanager
def _stubbed(graph: gs.Graph):
    """Swap every numeric constant over ``SKELETON_STUB_BYTES`` for a one-element stub with the same name, type and
    dims; yield the swapped constants (their real values are restored on exit, so the graph is left as it was)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    swapped: list[tuple[gs.Constant, object]] = []
    try:
        for t in graph.tensors().values():
            if not isinstance(t, gs.Constant) or t.dtype is None:
                continue
            values = t._values
            nbytes = getattr(values, "nbytes", 0)
            if nbytes <= SKELETON_STUB_BYTES or not hasattr(values, "shape"):
                continue
            stub = onnx.TensorProto(name=t.name, dims=list(t.shape))
            if isinstance(values, LazyValues):
                if values.tensor.data_location == onnx.TensorProto.EXTERNAL:
                    continue
                stub.data_type = values.tensor.data_type
            elif isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
                stub.data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
            else:
                continue
            if stub.data_type == onnx.TensorProto.STRING:
                continue
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(stub.data_type).itemsize
            stub.raw_data = b"\0" * itemsize
            swapped.append((t, values))
            t._values = LazyValues(stub)
        yield [t for t, _ in swapped]
    finally:
        for t, values in swapped:
            t._values = values


def graph_skeleton(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The model without its large weights: every constant over ``SKELETON_STUB_BYTES`` keeps its name, type and dims
    but holds a single element of data.

    Shape inference only needs dims (and the values of small shape-like constants, which are kept), so checking a
    skeleton costs milliseconds where checking a 100 MB model costs a second. The graph is not modified.
    """
    with _stubbed(graph):
        return graph_to_model(graph, template)


# -- streaming serialization --------------------------------------------------------------------------------------------
# Exporting a graph to a ModelProto copies every weight into protobuf, and serializing copies it again. To write a model
# (or hand it to ONNX Runtime) we instead serialize the small rest of the model once and append each large initializer
# as its own protobuf field, its raw data taken straight from the numpy buffer. Protobuf allows a message's fields in any
# order and concatenates repeated fields, so the bytes parse to the same model (initializers in a different order).

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def len_field(number: int, length: int) -> bytes:
    return varint((number << 3) | 2) + varint(length)


_GRAPH_FIELD, _INITIALIZER_FIELD = 7, 5  # ModelProto.graph, GraphProto.initializer
_DIMS, _DATA_TYPE, _NAME, _RAW_DATA = 1, 2, 8, 9  # TensorProto fields


def _tensor_pieces(t: gs.Constant) -> list:
    """Serialized TensorProto of a constant, as byte pieces (the raw data is a view of the numpy buffer, not a copy)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
    from onnx_graphsurgeon.ir.tensor import LazyValues

    values = t._values
    if isinstance(values, LazyValues):
        values.tensor.name = t.name
        return [values.tensor.SerializeToString()]
    arr = np.asarray(values)
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
    except (KeyError, TypeError, ValueError):
        data_type = None
    if data_type is None or arr.dtype.kind not in "biuf":
        return [OnnxExporter.export_tensor_proto(t).SerializeToString()]
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    name = t.name.encode()
    raw = memoryview(arr.reshape(-1).view(np.uint8))
    head = b"".join(varint((_DIMS << 3) | 0) + varint(int(d)) for d in arr.shape)
    head += varint((_DATA_TYPE << 3) | 0) + varint(data_type)
    head += len_field(_NAME, len(name)) + name + len_field(_RAW_DATA, raw.nbytes)
    return [head, raw]


def serialize_pieces(graph: gs.Graph, template: onnx.ModelProto | None = None) -> list:
    """The model of ``graph`` serialized as a list of byte pieces whose concatenation is a valid ONNX file."""
    with _stubbed(graph) as big:
        model = graph_to_model(graph, template)
    names = {t.name for t in big}
    small = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(small)
    graph_bytes = model.graph.SerializeToString()
    model.ClearField("graph")
    tensors = []
    for t in big:
        pieces = _tensor_pieces(t)
        tensors.append([len_field(_INITIALIZER_FIELD, sum(len(memoryview(p)) for p in pieces)), *pieces])
    graph_len = len(graph_bytes) + sum(len(memoryview(p)) for ps in tensors for p in ps)
    out = [model.SerializeToString(), len_field(_GRAPH_FIELD, graph_len), graph_bytes]
    for ps in tensors:
        out.extend(ps)
    return out


def graph_nbytes(graph: gs.Graph) -> int:
    """Bytes of constant data in ``graph`` (from shapes; nothing is loaded)."""
    return sum(int(getattr(t._values, "nbytes", 0)) for t in graph.tensors().values() if isinstance(t, gs.Constant))


def check_output_path(path: str | os.PathLike, protect: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an output path that is a protected file (the input model), a folder, or in a folder that does not exist."""
    out = Path(path)
    for prot in protect:
        if out.exists() and Path(prot).exists() and os.path.samefile(out, prot):
            raise ModelSaveError(f"{out}: refusing to overwrite the input model (use --in-place to allow it)")
    if out.is_dir():
        raise ModelSaveError(f"{out}: is a folder")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ModelSaveError(f"{out}: folder {folder} does not exist")
    return out


def atomic_output(
    path: str | os.PathLike, write: Callable[[Path], None], *, protect: tuple[str | os.PathLike, ...] = ()
) -> Path:
    """Run ``write(tmp)`` in a temporary folder beside ``path``; then rename every file it wrote there into place,
    companions first (``NAME.data``, ``NAME.bin`` ...) and ``path`` itself last. A failure leaves nothing behind and
    the old output, if any, untouched."""
    out = check_output_path(path, protect)
    folder = out.parent if str(out.parent) else Path(".")
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder))
    except OSError as e:
        raise ModelSaveError(f"{out}: cannot write in {folder}: {e.strerror or e}") from e
    try:
        tmp = tmpdir / out.name
        write(tmp)
        companions = [f for f in tmpdir.iterdir() if f.name != out.name]
        for f in companions:
            check_output_path(folder / f.name, protect)
        for f in companions:
            os.replace(f, folder / f.name)
        os.replace(tmp, out)
    except OSError as e:
        raise ModelSaveError(f"{out}: write failed: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def save_graph(
    graph: gs.Graph,
    template: onnx.ModelProto | None,
    path: str | os.PathLike,
    *,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write the model of ``graph`` atomically without building it in memory first (see :func:`serialize_pieces`).
    Models too large for one protobuf message go through :func:`save` with external data."""
    if graph_nbytes(graph) >= EXTERNAL_DATA_THRESHOLD:
        return save(graph_to_model(graph, template), path, external_data=True, protect=protect)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for piece in serialize_pieces(graph, template):
                f.write(piece)

    return atomic_output(path, write, protect=protect)


def checkable(skeleton: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a skeleton whose stubs are self-consistent one-element tensors, for the ONNX checker (which compares
    data size with dims). Use :func:`graph_skeleton` itself for shape inference (which needs the real dims)."""
    m = onnx.ModelProto()
    m.CopyFrom(skeleton)
    for t in m.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if t.HasField("raw_data") and len(t.dims) and int(np.prod(t.dims)) * itemsize != len(t.raw_data):
            del t.dims[:]
            t.dims.append(1)
    return m
