"""Input shapes: parsing ``--input-shape`` specs, resolving graph input shapes, shape inference helpers."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxopt.errors import OptionsError, PreconditionError

_SPEC_RE = re.compile(r"^(?P<name>[^=]+)=(?P<dims>\d+(?:[x,]\d+)*)$")


def parse_shape(text: str) -> tuple[int, ...]:
    dims = re.split(r"[x,]", text.strip())
    try:
        shape = tuple(int(d) for d in dims)
    except ValueError:
        raise OptionsError(f"bad shape {text!r}: expected dims like 1x3x224x224") from None
    if any(d <= 0 for d in shape):
        raise OptionsError(f"bad shape {text!r}: dims must be positive")
    return shape


def parse_input_shapes(specs: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """``["input=1x3x224x224", ...]`` -> ``{"input": (1, 3, 224, 224)}``."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        m = _SPEC_RE.match(spec.strip())
        if not m:
            raise OptionsError(f"bad --input-shape {spec!r}: expected NAME=DIMS, e.g. input=1x3x224x224")
        name = m.group("name").strip()
        if name in out:
            raise OptionsError(f"--input-shape given twice for {name!r}")
        out[name] = parse_shape(m.group("dims"))
    return out


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # str/None for dynamic dims

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of the graph (initializers listed as inputs, an old-IR habit, are skipped)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise PreconditionError(f"input {vi.name!r} is not a tensor; only tensor inputs are supported")
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape: list[int | str | None] = []
        if tt.HasField("shape"):
            for d in tt.shape.dim:
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(int(d.dim_value))
                elif d.HasField("dim_param"):
                    shape.append(d.dim_param)
                else:
                    shape.append(None)
        specs.append(InputSpec(vi.name, np.dtype(dtype), tuple(shape)))
    return specs


def resolve_input_shapes(
    model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None, *, default_batch: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every graph input; dynamic dims must be given in ``overrides``, never guessed.

    ``default_batch``: when given, a dynamic LEADING dim (the batch of an exported model) takes this value; other
    dynamic dims still need ``overrides``. Validation uses 1; analyses that must not guess (MACs) leave it None.
    """
    overrides = dict(overrides or {})
    specs = graph_inputs(model)
    names = {s.name for s in specs}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise OptionsError(
            f"--input-shape names unknown input(s) {', '.join(map(repr, unknown))}; inputs are: {', '.join(sorted(names))}"
        )
    out: dict[str, tuple[int, ...]] = {}
    missing = []
    for s in specs:
        if s.name in overrides:
            shape = overrides[s.name]
            if len(shape) != len(s.shape) and s.shape:
                raise OptionsError(f"--input-shape {s.name}: rank {len(shape)} but the input has rank {len(s.shape)}")
            for i, (want, have) in enumerate(zip(shape, s.shape)):
                if isinstance(have, int) and have != want:
                    raise OptionsError(
                        f"--input-shape {s.name}: dim {i} is fixed to {have} in the model, got {want} "
                        "(use the set-input-shape pass to change a fixed shape)"
                    )
            out[s.name] = shape
        elif s.is_static:
            out[s.name] = tuple(int(d) for d in s.shape)  # type: ignore[arg-type]
        elif default_batch is not None and s.shape and all(isinstance(d, int) for d in s.shape[1:]):
            out[s.name] = (default_batch, *s.shape[1:])  # type: ignore[arg-type]
        else:
            missing.append(f"{s.name}{list(s.shape)}")
    if missing:
        raise PreconditionError(
            "dynamic input dims: " + ", ".join(missing) + "; give them with --input-shape NAME=DIMS (e.g. input=1x3x224x224)"
        )
    return out


def batch_defaulted(model: onnx.ModelProto, given: dict[str, tuple[int, ...]]) -> list[str]:
    """Inputs whose dynamic batch :func:`resolve_input_shapes` fills with ``default_batch`` (not given by the user)."""
    return [s.name for s in graph_inputs(model) if not s.is_static and s.name not in given]


def infer_shapes(model: onnx.ModelProto, *, strict: bool = False, data_prop: bool = True) -> onnx.ModelProto:
    """ONNX shape inference (by path for models too large for one message)."""
    from onnxopt.model import EXTERNAL_DATA_THRESHOLD, tensor_bytes

    if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=strict, data_prop=data_prop)
    import tempfile
    from pathlib import Path

    from onnxopt.model import _write, load

    with tempfile.TemporaryDirectory(prefix="onnxopt-infer-") as d:
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        _write(model, src, external=True)
        onnx.shape_inference.infer_shapes_path(str(src), str(dst), check_type=True, strict_mode=strict, data_prop=data_prop)
        return load(dst, check=False)


def value_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """Shapes of every value known in an inferred model (inputs, outputs, value_info, initializers)."""
    out: dict[str, tuple[int | str | None, ...]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            out[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim
            )
    for t in g.initializer:
        out[t.name] = tuple(t.dims)
    return out


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element types (``onnx.TensorProto.FLOAT`` ...) of every value known in a model: inputs, outputs,
    value_info (run shape inference first to fill it), initializers and ``Constant`` node outputs."""
    out: dict[str, int] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        out[t.name] = t.data_type
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value" and a.t.data_type:
                    out[n.output[0]] = a.t.data_type
                elif a.name in ("value_float", "value_floats"):
                    out[n.output[0]] = onnx.TensorProto.FLOAT
                elif a.name in ("value_int", "value_ints"):
                    out[n.output[0]] = onnx.TensorProto.INT64
    return out
