"""The main job as one call: passes through the manager, then numerical validation against the original."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.analysis import summarize
from onnxopt.errors import OnnxoptError, ValidationError
from onnxopt.model import EXTERNAL_DATA_THRESHOLD, graph_to_model, save, save_graph, serialize_pieces, tensor_bytes
from onnxopt.pass_base import Pass, PassContext
from onnxopt.pass_manager import PassManager, RunRecord, Verifier
from onnxopt.shapes import batch_defaulted
from onnxopt.validate import Tolerances, compare_outputs, random_inputs, run, session


class OptimizeResult:
    """The outcome of :func:`optimize`: the run record, the validation verdict, and the new model.

    ``model`` is exported from the rewritten graph on first use; :meth:`save` streams the graph to a file without
    building the whole ModelProto in memory (see :func:`onnxopt.model.save_graph`).
    """

    def __init__(self, original: onnx.ModelProto, graph: gs.Graph | None, template: onnx.ModelProto,
                 record: RunRecord, validated: bool, ok: bool) -> None:
        self._graph = graph
        self._template = template
        self._model: onnx.ModelProto | None = None if graph is not None else original
        self.record = record
        self.validated = validated
        self.ok = ok  # validation passed (or was not asked for)

    @property
    def changed(self) -> bool:
        return self._graph is not None

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            self._model = graph_to_model(self._graph, self._template)
        return self._model

    def serialized(self) -> bytes:
        """The new model as bytes (for ONNX Runtime), without an intermediate ModelProto."""
        if self._model is not None:
            return self._model.SerializeToString()
        return b"".join(serialize_pieces(self._graph, self._template))

    def save(self, path, *, protect=()):
        """Write the new model atomically (see :func:`onnxopt.model.save`)."""
        if self._model is not None:
            return save(self._model, path, protect=protect)
        return save_graph(self._graph, self._template, path, protect=protect)


def _calibration_feeds(ctx: PassContext, max_samples: int = 32) -> dict[str, np.ndarray] | None:
    """The first batch (at most ``max_samples``) of real calibration data, to validate on instead of random inputs
    (int8 ranges are calibrated for real data: random inputs would misreport a quantized model, and real data also
    gives the dims of dynamic inputs)."""
    source = ctx.calibration
    if source is None or getattr(source, "is_random", False) or not hasattr(source, "batches"):
        return None
    for batch in source.batches(max_samples):
        return batch
    return None


def optimize(
    model: onnx.ModelProto,
    passes: list[Pass],
    *,
    ctx: PassContext | None = None,
    validate: bool = True,
    feeds: dict[str, np.ndarray] | None = None,
    tolerances: Tolerances | None = None,
    verify_each: bool = False,
    on_pass: Callable[[str, int, int], None] | None = None,
) -> OptimizeResult:
    """Run ``passes`` over ``model`` and compare the result with the original in ONNX Runtime.

    ``tolerances`` default by the pipeline's kind: exact pipelines must agree within :class:`Tolerances`' defaults;
    lossy ones (pruning, INT8) are reported, not failed, unless tolerances are given. Returns the new model and the run
    record; ``ok`` is False when validation failed (the caller decides whether to write anyway).
    """
    ctx = ctx or PassContext()
    reference = None
    feeds_note = ""
    if validate or verify_each:
        if feeds is None:
            feeds = _calibration_feeds(ctx)
            if feeds is not None:
                feeds_note = f", on {next(iter(feeds.values())).shape[0]} calibration sample(s)"
        if feeds is None:
            feeds = random_inputs(model, ctx.input_shapes, seed=ctx.seed)
            defaulted = batch_defaulted(model, ctx.input_shapes)
            if defaulted:
                feeds_note = f", random inputs with dynamic batch of {', '.join(defaulted)} set to 1"
        try:
            reference = run(session(model), feeds)
        except OnnxoptError as e:
            raise OnnxoptError(f"cannot validate: the input model does not run in ONNX Runtime ({e}); "
                               "use --no-validate to skip validation") from e
    verifier = Verifier(feeds, reference, tolerances) if verify_each and reference is not None else None
    manager = PassManager(passes, verifier=verifier, summarize=summarize, on_pass=on_pass)
    graph, record = manager.run_graph(model, ctx)
    result = OptimizeResult(model, graph, ctx.template, record, validated=reference is not None, ok=True)
    if validate and reference is not None and graph is not None and not _inputs_accept(graph, feeds):
        # e.g. set-input-shape changed the resolution: the original's outputs cannot be compared with the new ones
        result.validated = False
        record.notes.append("not validated: the pipeline changed the input shapes, so the outputs cannot be compared "
                            "with the original's")
    elif validate and reference is not None:
        tol = tolerances if tolerances is not None else Tolerances.for_kind(record.kind)
        new_session = session(result.serialized() if result.changed and tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD
                              else result.model)
        cmp = compare_outputs(reference, run(new_session, feeds), tol)
        result.ok = cmp.ok
        record.validation = {
            "mode": "ONNX Runtime CPU, graph optimizations off" + feeds_note,
            "kind": record.kind,
            "report_only": cmp.report_only,
            "ok": cmp.ok,
            "outputs": cmp.rows(),
        }
        extra = ctx.artifacts.get("validation_extra")
        if extra:
            record.validation["extra"] = extra
    return result


def _inputs_accept(graph, feeds: dict[str, np.ndarray]) -> bool:
    """Whether the rewritten graph's inputs take the validation feeds (same names, ranks and fixed dims)."""
    inputs = {t.name: t for t in graph.inputs}
    if set(inputs) != set(feeds):
        return False
    for name, t in inputs.items():
        shape = feeds[name].shape
        if t.shape is not None and (len(t.shape) != len(shape) or any(
                isinstance(d, int) and d != s for d, s in zip(t.shape, shape))):
            return False
    return True


__all__ = ["optimize", "OptimizeResult", "ValidationError"]
