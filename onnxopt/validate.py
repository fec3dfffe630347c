"""Numerical validation with ONNX Runtime: seeded inputs, reference runs, per-output metrics and tolerances.

ONNX Runtime runs with graph optimizations disabled by default, so that its own fusions cannot hide a broken rewrite.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxopt.errors import OnnxoptError, OptionsError, first_line
from onnxopt.shapes import graph_inputs, resolve_input_shapes

#: Default per-kind tolerances. Exact rewrites must agree elementwise: |new - ref| <= atol + rtol * |ref|.
EXACT_ATOL = 1e-4
EXACT_RTOL = 1e-3


def _session_options(optimize: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    return so


def session(model: onnx.ModelProto | bytes | str | os.PathLike, *, optimize: bool = False,
            initializers: dict[str, np.ndarray] | None = None, threads: int | None = None):
    """An ONNX Runtime CPU session for a model proto, serialized bytes or a path (big protos go through a file).

    ``initializers``: values of initializers that the model declares as external data, handed to ONNX Runtime from
    memory (``add_external_initializers``) instead of being serialized with the model. ``threads``: intra-op threads
    (default: ONNX Runtime's, one per core).
    """
    import onnxruntime as ort

    from onnxopt.model import EXTERNAL_DATA_THRESHOLD, _write, tensor_bytes

    so = _session_options(optimize)
    if threads:
        so.intra_op_num_threads = threads
    if initializers:
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in initializers.values()]
        so.add_external_initializers(list(initializers), values)
    providers = ["CPUExecutionProvider"]
    try:
        if isinstance(model, (str, os.PathLike)):
            return ort.InferenceSession(str(model), so, providers=providers)
        if isinstance(model, (bytes, bytearray)):
            return ort.InferenceSession(bytes(model), so, providers=providers)
        if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
        with tempfile.TemporaryDirectory(prefix="onnxopt-ort-") as d:
            path = Path(d) / "model.onnx"
            _write(model, path, external=True)
            return ort.InferenceSession(str(path), so, providers=providers)
    except OnnxoptError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        msg = first_line(e)
        raise OnnxoptError(f"ONNX Runtime cannot load the model: {msg}") from e


def run(sess_or_model, feeds: dict[str, np.ndarray], *, optimize: bool = False) -> dict[str, np.ndarray]:
    sess = sess_or_model if hasattr(sess_or_model, "run") else session(sess_or_model, optimize=optimize)
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, feeds)
    except Exception as e:  # noqa: BLE001
        msg = first_line(e)
        raise OnnxoptError(f"ONNX Runtime failed to run the model: {msg}") from e
    return dict(zip(names, values))


def random_inputs(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None, *, seed: int = 0,
    default_batch: int | None = 1,
) -> dict[str, np.ndarray]:
    """Seeded inputs: floats ~ N(0, 1), integers in [0, 8), bools fair coins.

    Dynamic dims come from ``shapes``; a dynamic leading (batch) dim not given there is ``default_batch`` (1). Any other
    dynamic dim must be given: it is never guessed.
    """
    rng = np.random.default_rng(seed)
    resolved = resolve_input_shapes(model, shapes, default_batch=default_batch)
    feeds = {}
    for spec in graph_inputs(model):
        shape = resolved[spec.name]
        dt = spec.dtype
        if dt == np.bool_:
            feeds[spec.name] = rng.random(shape) < 0.5
        elif np.issubdtype(dt, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dt)
        elif np.issubdtype(dt, np.integer):
            feeds[spec.name] = rng.integers(0, 8, size=shape).astype(dt)
        else:
            raise OptionsError(f"input {spec.name!r} has dtype {dt}; give inputs with --inputs FILE.npz")
    return feeds


def load_inputs(path: str | os.PathLike, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Inputs from an ``.npz`` whose keys are the graph's input names, or ``FILE.npz:KEY`` for a model with one input
    (e.g. ``models/digits.npz:test_input``)."""
    p, key = Path(path), None
    if not p.is_file() and ":" in str(path):
        head, _, key = str(path).rpartition(":")
        p = Path(head)
    if not p.is_file():
        raise OptionsError(f"--inputs {p}: no such file")
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise OptionsError(f"--inputs {p}: not a readable .npz ({e})") from e
    specs = {s.name: s for s in graph_inputs(model)}
    names = list(specs)
    if key is not None:
        if len(names) != 1:
            raise OptionsError(f"--inputs {path}: FILE:KEY needs a model with one input; this one has {', '.join(names)}")
        if key not in data.files:
            raise OptionsError(f"--inputs {path}: no array {key!r}; has {', '.join(data.files)}")
        return {names[0]: np.asarray(data[key]).astype(specs[names[0]].dtype, copy=False)}
    missing = [n for n in names if n not in data.files]
    if missing:
        raise OptionsError(f"--inputs {p}: missing arrays for input(s) {', '.join(missing)}; has {', '.join(data.files)}"
                           + (" (use FILE.npz:KEY to name the array)" if len(names) == 1 else ""))
    return {n: np.asarray(data[n]).astype(specs[n].dtype, copy=False) for n in names}


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    sqnr_db: float
    nonfinite_new: int  # NaN/Inf in the new output where the reference is finite
    exact_match: bool
    top1_agreement: float | None = None  # for [N, C] outputs with N > 1 and C > 1: share of rows with the same argmax


def output_metrics(name: str, ref: np.ndarray, new: np.ndarray) -> OutputMetrics:
    if ref.shape != new.shape:
        raise OnnxoptError(f"output {name!r}: shape changed from {ref.shape} to {new.shape}")
    if ref.dtype.kind not in "fc":
        equal = bool(np.array_equal(ref, new))
        diff = float(np.max(np.abs(ref.astype(np.int64) - new.astype(np.int64)))) if ref.size and ref.dtype.kind in "iub" else (0.0 if equal else math.inf)
        return OutputMetrics(name, ref.shape, diff, diff, 0.0 if equal else math.inf, 1.0 if equal else 0.0,
                             math.inf if equal else 0.0, 0, equal)
    r = ref.astype(np.float64).ravel()
    n = new.astype(np.float64).ravel()
    finite = np.isfinite(r)
    nonfinite_new = int(np.count_nonzero(finite & ~np.isfinite(n)))
    # Compare where the reference is finite; elsewhere require the same special value.
    same_special = bool(np.all((r[~finite] == n[~finite]) | (np.isnan(r[~finite]) & np.isnan(n[~finite]))))
    r, n = r[finite], n[finite]
    if r.size == 0:
        return OutputMetrics(name, ref.shape, 0.0, 0.0, 0.0, 1.0, math.inf, nonfinite_new, same_special)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        err = np.abs(n - r)
        err = np.where(np.isfinite(err), err, math.inf)
        max_abs = float(err.max())
        denom = np.abs(r)
        rel = np.where(denom > 0, err / np.where(denom > 0, denom, 1), np.where(err > 0, math.inf, 0.0))
        max_rel = float(rel.max())
        nr = float(np.linalg.norm(r))
        ne = float(np.linalg.norm(n - r)) if np.all(np.isfinite(n)) else math.inf
        rel_l2 = ne / nr if nr > 0 else (0.0 if ne == 0 else math.inf)
        nn = float(np.linalg.norm(n)) if np.all(np.isfinite(n)) else math.inf
        if nr == 0 and nn == 0:
            cosine = 1.0
        elif nr == 0 or nn == 0 or not math.isfinite(nn):
            cosine = 0.0
        else:
            cosine = float(np.dot(r, n) / (nr * nn))
        sqnr = math.inf if ne == 0 else (20 * math.log10(nr / ne) if nr > 0 and math.isfinite(ne) else -math.inf)
    exact = bool(max_abs == 0.0 and same_special and nonfinite_new == 0)
    top1 = None
    if ref.ndim == 2 and ref.shape[0] > 1 and ref.shape[1] > 1:
        top1 = float(np.mean(ref.argmax(axis=1) == new.argmax(axis=1)))
    return OutputMetrics(name, ref.shape, max_abs, max_rel, rel_l2, cosine, sqnr, nonfinite_new, exact, top1)


@dataclass
class Tolerances:
    """Per-output tolerances. ``None`` fields are not checked; ``report_only`` turns failures into a report."""

    atol: float | None = EXACT_ATOL
    rtol: float | None = EXACT_RTOL
    min_cosine: float | None = None
    per_output_atol: dict[str, float] = field(default_factory=dict)
    per_output_rtol: dict[str, float] = field(default_factory=dict)
    report_only: bool = False

    @classmethod
    def for_kind(cls, kind: str) -> "Tolerances":
        """Exact pipelines must agree tightly; lossy ones (pruning, INT8) report rather than fail."""
        if kind == "lossy":
            return cls(atol=None, rtol=None, report_only=True)
        return cls()

    def for_output(self, name: str) -> tuple[float | None, float | None]:
        return self.per_output_atol.get(name, self.atol), self.per_output_rtol.get(name, self.rtol)


@dataclass(frozen=True)
class OutputCheck:
    metrics: OutputMetrics
    ok: bool
    reason: str


@dataclass(frozen=True)
class Comparison:
    outputs: list[OutputCheck]
    report_only: bool

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def failed(self) -> list[OutputCheck]:
        return [o for o in self.outputs if not o.ok]

    def rows(self) -> list[dict]:
        """One dict per output: its metrics plus ``ok`` and ``reason`` (the report's and the JSON record's rows)."""
        from dataclasses import asdict

        return [dict(asdict(o.metrics), ok=o.ok, reason=o.reason) for o in self.outputs]

    def summary(self) -> str:
        bad = self.failed
        if not bad:
            return "all outputs within tolerance"
        return "; ".join(f"{o.metrics.name}: {o.reason}" for o in bad)


def compare_outputs(
    ref: dict[str, np.ndarray], new: dict[str, np.ndarray], tol: Tolerances | None = None
) -> Comparison:
    tol = tol or Tolerances()
    missing = [k for k in ref if k not in new]
    if missing:
        raise OnnxoptError(f"output(s) {', '.join(missing)} missing from the optimized model")
    checks = []
    for name, r in ref.items():
        n = new[name]
        m = output_metrics(name, r, n)
        reasons = []
        if m.nonfinite_new:
            reasons.append(f"{m.nonfinite_new} new NaN/Inf values")
        atol, rtol = tol.for_output(name)
        if atol is not None or rtol is not None:
            a = atol or 0.0
            rt = rtol or 0.0
            if r.dtype.kind in "fc":
                with np.errstate(invalid="ignore"):
                    bad = ~np.isclose(n.astype(np.float64), r.astype(np.float64), rtol=rt, atol=a, equal_nan=True)
                nbad = int(np.count_nonzero(bad))
                if nbad:
                    reasons.append(f"{nbad}/{r.size} values beyond atol={a:g} rtol={rt:g} (max abs {m.max_abs:.3g})")
            elif not m.exact_match:
                reasons.append("integer output differs")
        if tol.min_cosine is not None and m.cosine < tol.min_cosine:
            reasons.append(f"cosine {m.cosine:.6f} < {tol.min_cosine}")
        ok = not reasons or (tol.report_only and not m.nonfinite_new)
        checks.append(OutputCheck(m, ok, "; ".join(reasons)))
    return Comparison(checks, tol.report_only)


def compare_models(
    ref_model: onnx.ModelProto,
    new_model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    tol: Tolerances | None = None,
    *,
    ref_outputs: dict[str, np.ndarray] | None = None,
) -> Comparison:
    ref = ref_outputs if ref_outputs is not None else run(ref_model, feeds)
    new = run(new_model, feeds)
    return compare_outputs(ref, new, tol)


def parse_per_output(specs: tuple[str, ...] | list[str], flag: str) -> tuple[float | None, dict[str, float]]:
    """``["1e-4", "logits=1e-3"]`` -> (global 1e-4, {"logits": 1e-3})."""
    glob: float | None = None
    per: dict[str, float] = {}
    for s in specs:
        name, _, val = s.rpartition("=")
        try:
            v = float(val)
        except ValueError:
            raise OptionsError(f"bad {flag} {s!r}: expected VALUE or OUTPUT=VALUE") from None
        if v < 0:
            raise OptionsError(f"bad {flag} {s!r}: must be >= 0")
        if name:
            per[name] = v
        else:
            glob = v
    return glob, per
