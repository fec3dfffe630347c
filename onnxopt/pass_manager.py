"""The pass manager: runs passes, enforces the pass contract, checks invariants, times passes, records the run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import ModelLoadError, OnnxoptError, PassError, PreconditionError, ValidationError, first_line
from onnxopt.graphutil import fingerprint
from onnxopt.model import (
    check_model, checkable, default_opset, freeze_overridable, graph_skeleton, graph_to_model, header_of,
    unfreeze_overridable,
)
from onnxopt.pass_base import Pass, PassContext, PassResult
from onnxopt.shapes import infer_shapes


def graph_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Size figures of a model: node count, initializer count/elements/bytes (shared tensors counted once)."""
    from onnxopt.model import _iter_tensors

    nodes = sum(1 for _ in model.graph.node)
    n_init = len(model.graph.initializer)
    elements = 0
    nbytes = 0
    for t in _iter_tensors(model):
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        elements += n
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 0
        nbytes += n * itemsize
    return {"nodes": nodes, "initializers": n_init, "weight_elements": elements, "weight_bytes": nbytes}


@dataclass
class PassRecord:
    name: str
    options: dict[str, Any]
    kind: str
    changed: bool
    seconds: float
    stats: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    check_seconds: float = 0.0
    verify: list[dict[str, Any]] | None = None


@dataclass
class RunRecord:
    passes: list[PassRecord] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """'lossy' if any pass that changed the graph is lossy, else 'exact'."""
        return "lossy" if any(p.changed and p.kind == "lossy" for p in self.passes) else "exact"

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "before": self.before,
            "after": self.after,
            "kind": self.kind,
            "passes": [asdict(p) for p in self.passes],
            "validation": self.validation,
            "notes": self.notes,
        }


@dataclass
class Verifier:
    """Feeds and reference outputs for ``--verify-each``; compares after every pass that changed the graph."""

    feeds: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    tolerances: Any = None  # validate.Tolerances; defaults per cumulative pass kind


@dataclass
class _Baseline:
    strict_shapes: bool


class PassManager:
    """Run configured passes over a model.

    After every pass that reports a change, the manager exports the graph and checks the invariants: the ONNX checker,
    shape inference (strict when the input model passed strict inference), and topological order. With a
    :class:`Verifier` it also compares outputs with ONNX Runtime after each such pass, so that a broken rewrite is pinned
    to the pass that made it. It also enforces the pass contract: ``changed`` must be exact, analysis passes must not
    change the graph.

    ``summarize(model, ctx)`` gives the size figures recorded before and after each pass. It is called with a SKELETON
    of the model (:func:`onnxopt.model.graph_skeleton`: constants over 4 KiB keep name, dtype and dims but hold one
    element), so it must use dims, never weight values. Checks run on the skeleton too; the full model is exported once.
    """

    def __init__(
        self,
        passes: list[Pass],
        *,
        check_invariants: bool = True,
        verifier: Verifier | None = None,
        summarize: Callable[[onnx.ModelProto, PassContext], dict[str, Any]] | None = None,
        on_pass: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.check_invariants = check_invariants
        self.verifier = verifier
        self.summarize = summarize or (lambda m, ctx: graph_summary(m))
        self.on_pass = on_pass

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> tuple[onnx.ModelProto, RunRecord]:
        """Run the passes; returns the new model (``model`` itself when nothing changed) and the run record."""
        ctx = ctx or PassContext()
        graph, record = self.run_graph(model, ctx)
        return (graph_to_model(graph, ctx.template) if graph is not None else model), record

    def run_graph(self, model: onnx.ModelProto, ctx: PassContext) -> tuple[gs.Graph | None, RunRecord]:
        """Like :meth:`run`, but returns the rewritten graph (None when nothing changed) without exporting it, for
        callers that stream it to a file (:func:`onnxopt.model.save_graph`) instead of building a ModelProto."""
        ctx.template = header_of(model)
        ctx.opset = default_opset(model)
        graph = gs.import_onnx(model)
        overridable = [t.name for t in ctx.template.graph.initializer]
        if ctx.freeze_initializer_inputs:
            freeze_overridable(ctx.template)
        else:
            unfreeze_overridable(graph, ctx.template)
        try:
            skeleton = graph_skeleton(graph, ctx.template)
        except Exception as e:  # noqa: BLE001 - e.g. optional-typed values, which graphsurgeon cannot export
            raise ModelLoadError(f"onnx-graphsurgeon cannot represent this model: {_unrepresentable(model, e)}") from e
        record = RunRecord(before=self.summarize(skeleton, ctx))
        if overridable:
            record.notes.append(
                f"{len(overridable)} initializer(s) are also graph inputs (defaults a caller may override), e.g. "
                f"{overridable[0]!r}: " + (
                    "treated as constants and removed from the inputs (--freeze-initializer-inputs)"
                    if ctx.freeze_initializer_inputs else
                    "kept as inputs, so no pass folds them; --freeze-initializer-inputs treats them as constants"
                )
            )
        baseline = self._baseline(skeleton) if self.check_invariants else None
        # graphsurgeon drops initializers that nothing uses when it imports a model: say so, and write the result
        # even if no pass changes anything (the output then differs from the input by exactly those).
        kept = {n for n, t in graph.tensors().items() if isinstance(t, gs.Constant)} | {t.name for t in graph.inputs}
        dropped = [t.name for t in model.graph.initializer if t.name not in kept]
        if dropped:
            record.notes.append(f"{len(dropped)} unused initializer(s) dropped on import, e.g. {dropped[0]!r}")
        changed_any = bool(dropped)
        done: list[str] = []
        fp = fingerprint(graph)  # nothing changes the graph between passes: one pass's "after" is the next's "before"
        for i, p in enumerate(self.passes):
            if self.on_pass:
                self.on_pass(p.name, i, len(self.passes))
            before = record.passes[-1].after if record.passes else record.before
            where = f"pass {p.name!r} (#{i + 1}) failed" + (f" after {', '.join(done)}" if done else "")
            t0 = time.perf_counter()
            try:
                p.requires(graph, ctx)
                result = p.run(graph, ctx)
            except PreconditionError as e:
                raise PreconditionError(f"{where}: precondition not met: {e}") from e
            except OnnxoptError as e:
                raise type(e)(f"{where}: {e}") from e
            except Exception as e:  # noqa: BLE001 - keep the chain, name the pass
                raise PassError(f"{where}: {type(e).__name__}: {e}") from e
            seconds = time.perf_counter() - t0
            if not isinstance(result, PassResult):
                raise PassError(f"{where}: run() returned {type(result).__name__}, not PassResult")
            fp_after = fingerprint(graph)
            differs = fp_after != fp
            fp = fp_after
            if p.effective_kind == "analysis" and differs:
                raise PassError(f"{where}: analysis pass changed the graph")
            if result.changed != differs:
                raise PassError(
                    f"{where}: reported changed={result.changed} but the graph "
                    f"{'differs' if differs else 'is unchanged'} (the contract requires an exact flag)"
                )
            check_seconds = 0.0
            verify = None
            if result.changed:
                changed_any = True
                t1 = time.perf_counter()
                try:
                    skeleton = graph_skeleton(graph, ctx.template)
                except Exception as e:  # noqa: BLE001
                    raise PassError(f"{where}: the result cannot be exported: {type(e).__name__}: {e}") from e
                if baseline is not None:
                    self._check(skeleton, baseline, where)
                check_seconds = time.perf_counter() - t1
                after = self.summarize(skeleton, ctx)
                if self.verifier is not None:
                    verify = self._verify(graph_to_model(graph, ctx.template), record, p, where)
            else:
                after = before
            record.passes.append(
                PassRecord(
                    name=p.name, options=p.options_dict(), kind=p.effective_kind, changed=result.changed,
                    seconds=seconds, stats=dict(result.stats), before=before, after=after,
                    check_seconds=check_seconds, verify=verify,
                )
            )
            done.append(p.name)
        record.after = record.passes[-1].after if record.passes else record.before
        return (graph if changed_any else None), record

    # -- invariants -------------------------------------------------------------------------------------------------
    @staticmethod
    def _baseline(model: onnx.ModelProto) -> _Baseline:
        try:
            infer_shapes(model, strict=True)
            strict = True
        except Exception:  # noqa: BLE001 - the input model's own shortcoming; we only require "no worse"
            strict = False
        return _Baseline(strict_shapes=strict)

    @staticmethod
    def _check(skeleton: onnx.ModelProto, baseline: _Baseline, where: str) -> None:
        """Checks on the skeleton (weights stubbed): the checker on a self-consistent copy, inference on the real dims."""
        check_topological_order(skeleton, where)
        try:
            check_model(checkable(skeleton))
        except Exception as e:  # noqa: BLE001
            raise PassError(f"{where}: the ONNX checker rejects the result: {first_line(e)}") from e
        try:
            infer_shapes(skeleton, strict=baseline.strict_shapes)
        except Exception as e:  # noqa: BLE001
            raise PassError(f"{where}: shape inference fails on the result: {first_line(e)}") from e

    def _verify(self, model: onnx.ModelProto, record: RunRecord, p: Pass, where: str) -> list[dict[str, Any]]:
        from dataclasses import asdict

        from onnxopt.validate import Tolerances, compare_outputs, run

        v = self.verifier
        assert v is not None
        kind = "lossy" if record.kind == "lossy" or p.effective_kind == "lossy" else "exact"
        tol = v.tolerances if v.tolerances is not None else Tolerances.for_kind(kind)
        if kind == "lossy" and not tol.report_only:
            tol = Tolerances.for_kind("lossy")
        cmp = compare_outputs(v.reference, run(model, v.feeds), tol)
        if not cmp.ok:
            raise ValidationError(f"{where}: numerics broken by this pass: {cmp.summary()}")
        return [asdict(o.metrics) for o in cmp.outputs]


def _unrepresentable(model: onnx.ModelProto, error: Exception) -> str:
    """Why graphsurgeon cannot export ``model``: the first optional/map-typed value, else the error itself."""
    g = model.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        kind = vi.type.WhichOneof("value")
        if kind in ("optional_type", "map_type"):
            return f"value {vi.name!r} has an {kind.replace('_type', '')} type, which it does not support"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def check_topological_order(model: onnx.ModelProto, where: str = "") -> None:
    g = model.graph
    known = {t.name for t in g.initializer} | {t.name for t in g.input} | {""}
    for n in g.node:
        for name in n.input:
            if name not in known:
                raise PassError(f"{where}: node {n.name or n.op_type!r} uses {name!r} before it is produced")
        known.update(n.output)
    for o in g.output:
        if o.name not in known:
            raise PassError(f"{where}: graph output {o.name!r} is not produced")
