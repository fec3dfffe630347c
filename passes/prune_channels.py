"""``prune-channels``: remove whole channels from Conv/ConvTranspose/Gemm/MatMul layers, through any topology.

Channels are grouped by their dependencies (see :mod:`onnxopt.pruning`): removing output channel k of a layer removes
input channel k wherever that tensor flows - through BatchNormalization, activations, pooling, Resize, Concat offsets,
Split/Slice, residual Adds (coupled producers prune the same channels), depthwise convs, Flatten into a Gemm (the H*W
block of columns). Groups that reach something we cannot follow (a graph output, a Transpose moving the channel axis,
Softmax over channels, ...) are left alone and the reason is counted in ``skipped_<reason>``.

``mode=prune`` (lossy) ranks channels by ``importance`` and removes ``ratio`` of each group (or, with ``target_macs``,
the globally least important channels until the Conv/Gemm MACs reach that fraction), keeping counts multiples of
``round_to``. Recovery: ``recover=bias`` folds the removed channels' expected contribution (from the BatchNormalization
statistics) into the consumer's bias, data-free; ``recover=lstsq`` re-fits the consumers' weights by least squares on
calibration data (:mod:`onnxopt.pruning_recover`).

``mode=dead`` (exact) removes only channels that are constant (all-zero filters, zero BN gamma) and folds their constant
contribution into the consumers' biases, where that is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import OptionsError, PreconditionError, first_line
from onnxopt.pass_base import Pass, PassContext, PassResult, PassKind, option
from onnxopt.pruning import (
    ChannelGraph,
    Surgery,
    ValuePropagation,
    class_importance,
    dead_classes,
    equalize_blocks,
    fold_deltas,
    graph_shapes,
    group_table,
    layer_channels,
    original_layer_macs,
    predicted_macs,
    prune_report,
    reinfer_shapes,
    remove_dangling_constants,
    select,
    unprunable_summary,
)


@dataclass(frozen=True)
class PruneChannelsOptions:
    ratio: Optional[float] = option(None, help="Fraction of every prunable group's channels to remove (uniform).")
    layer_ratio: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Per-layer ratios 'pattern:ratio,...' (fnmatch on the names of the layers producing a "
                          "group's channels); they win over ratio and target_macs for the groups they match."},
    )
    target_macs: Optional[float] = option(
        None, help="Prune until the Conv/Gemm MACs are this fraction of the original (importance ranked globally).")
    importance: Literal["l1", "l2", "bn-gamma", "random"] = option(
        "l1", help="Channel importance: l1/l2 weight norms aggregated over the coupled layers, bn-gamma (|gamma| of "
                   "the BatchNormalizations, run before fold-bn), random (a baseline).")
    round_to: int = option(8, help="Kept channel counts are multiples of this (1: any count).")
    min_channels: int = option(1, help="Keep at least this many channels per group.")
    max_ratio: float = option(0.75, help="With target_macs: remove at most this fraction of any one group.")
    exclude: tuple[str, ...] = option((), help="Leave groups alone when a layer producing or consuming their "
                                               "channels matches one of these node-name patterns (fnmatch).")
    mode: Literal["prune", "dead"] = option(
        "prune", help="prune: remove the least important channels (lossy); dead: remove only constant channels "
                      "(all-zero filters or BN gamma) and fold their constant into the consumers' biases (exact).")
    dead_tol: float = option(0.0, help="mode=dead: weights with |w| <= dead_tol count as zero.")
    recover: Literal["none", "bias", "lstsq"] = option(
        "bias", help="After pruning: none; bias = fold the removed channels' expected contribution (BN statistics) "
                     "into the consumers' biases (data-free); lstsq = re-fit the consumers' weights by least squares "
                     "on calibration data (needs --calib).")
    calib_samples: int = option(512, help="recover=lstsq: use at most this many calibration samples.")
    ridge: float = option(1e-3, help="recover=lstsq: ridge factor (relative to the mean diagonal of X^T X), pulling "
                                     "towards the pruned weights.")


class PruneChannels(Pass):
    """Remove channels through dependency groups, with exact dead-channel removal and post-training recovery."""

    name = "prune-channels"
    Options = PruneChannelsOptions
    kind = "lossy"

    @property
    def effective_kind(self) -> PassKind:
        return "exact" if self.options.mode == "dead" else "lossy"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        o = self.options
        if o.ratio is not None and not 0.0 <= o.ratio < 1.0:
            raise OptionsError(f"prune-channels: ratio must be in [0, 1), got {o.ratio}")
        if o.target_macs is not None and not 0.0 < o.target_macs <= 1.0:
            raise OptionsError(f"prune-channels: target_macs must be in (0, 1], got {o.target_macs}")
        for pat, r in o.layer_ratio.items():
            if not 0.0 <= r < 1.0:
                raise OptionsError(f"prune-channels: layer_ratio {pat!r}: ratio must be in [0, 1), got {r}")
        if o.round_to < 1 or o.min_channels < 1:
            raise OptionsError("prune-channels: round_to and min_channels must be >= 1")
        if not 0.0 < o.max_ratio < 1.0:
            raise OptionsError(f"prune-channels: max_ratio must be in (0, 1), got {o.max_ratio}")
        if o.mode == "prune":
            if o.ratio is not None and o.target_macs is not None:
                raise OptionsError("prune-channels: give ratio or target_macs, not both")
            if o.ratio is None and o.target_macs is None and not o.layer_ratio:
                raise OptionsError("prune-channels: give ratio=, target_macs= or layer_ratio= (or mode=dead)")
            if o.recover == "lstsq" and ctx.calibration is None:
                raise PreconditionError("prune-channels: recover=lstsq needs calibration data (--calib)")
        if o.calib_samples < 1 or o.ridge < 0:
            raise OptionsError("prune-channels: calib_samples must be >= 1 and ridge >= 0")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        from onnxopt.model import graph_skeleton

        skel_before = graph_skeleton(graph, ctx.template)
        cg = ChannelGraph(graph, graph_shapes(graph, skeleton=skel_before))
        stats: dict = {"groups": len([g for g in cg.groups if g.layers])}
        counts, details = unprunable_summary(cg)
        for key, n in sorted(counts.items()):
            stats[f"skipped_{key}"] = n
        if details:
            stats["unprunable"] = "; ".join(details[:50]) + (f"; ... {len(details) - 50} more" if len(details) > 50
                                                              else "")
        prunable = [g for g in cg.groups if g.prunable and g.layers]
        stats["groups_prunable"] = len(prunable)
        if not prunable:
            stats["skipped_nothing_prunable"] = 1
            return PassResult(False, stats)

        present = np.zeros(cg.n_classes, dtype=bool)
        present[cg.class_of] = True
        deltas: dict[str, np.ndarray] = {}
        report_macs = True
        try:
            from onnxopt.analysis import analyze

            input_shapes = _analysis_shapes(skel_before, ctx)
            analysis_before = analyze(skel_before, input_shapes)
            original_layer_macs(cg, analysis_before)
        except Exception as e:  # noqa: BLE001 - MACs only decide target_macs and the stats
            if o.target_macs is not None and o.mode == "prune":
                raise PreconditionError(f"prune-channels: target_macs needs MACs of every layer: {e}") from e
            report_macs = False
            stats["macs_note"] = first_line(e)

        if o.mode == "dead":
            vp = ValuePropagation(cg, "exact", o.dead_tol)
            removable, notes, why = dead_classes(cg, vp)
            removable, kept_for_groups = equalize_blocks(cg, removable)
            if kept_for_groups:
                notes["dead_kept_group_structure"] = kept_for_groups
            keep = present & ~removable
            stats.update(notes)
            if why:
                stats["dead_kept"] = "; ".join(why[:20])
            stats["dead_removed"] = int(removable.sum())
            if removable.any():
                deltas, fold_notes = fold_deltas(cg, vp, keep)
                stats.update(fold_notes)
        else:
            imp, imp_notes = class_importance(cg, o.importance, seed=ctx.seed)
            stats.update(imp_notes)
            sel = select(cg, imp, ratio=o.ratio, overrides=dict(o.layer_ratio), target_macs=o.target_macs,
                         round_to=o.round_to, min_channels=o.min_channels, max_ratio=o.max_ratio, exclude=o.exclude)
            keep = sel.keep
            stats.update(sel.notes)
            if o.recover == "bias" and not keep[present].all():
                vp = ValuePropagation(cg, "gauss")
                deltas, fold_notes = fold_deltas(cg, vp, keep)
                stats.update({f"bias_{k}": v for k, v in fold_notes.items()})

        removed = int((present & ~keep).sum())
        stats["channels_before"] = int(present.sum())
        stats["channels_after"] = int((present & keep).sum())
        if removed == 0:
            stats["skipped_nothing_to_remove"] = 1
            return PassResult(False, stats)

        original = ctx.to_model(graph) if (o.mode == "prune" and o.recover == "lstsq") else None
        surgery = Surgery(graph, cg, keep)
        surgery.bias_delta = deltas
        for ly in cg.layers:
            surgery.layer(ly)
        for action in cg.actions:
            action(surgery)
        remove_dangling_constants(graph)
        skel_after = reinfer_shapes(graph, ctx.template)

        if original is not None:
            from onnxopt.pruning_recover import lstsq_refit

            notes = lstsq_refit(graph, original, cg, keep, ctx, samples=o.calib_samples, ridge=o.ridge)
            stats.update(notes)
            if getattr(ctx.calibration, "is_random", False):
                stats["recover_random_calibration"] = 1

        stats["groups_pruned"] = sum(1 for g in prunable if not keep[g.classes].all())
        stats["channels"] = group_table(cg, keep)
        rows = layer_channels(cg, keep)
        if report_macs:
            stats["layer_macs_before"] = sum(ly.macs for ly in cg.layers)
            stats["layer_macs_after"] = predicted_macs(cg, keep)
            if original is not None:  # lstsq may have added biases
                skel_after = graph_skeleton(graph, ctx.template)
            stats.update(prune_report(analysis_before, skel_after, input_shapes))
        ctx.artifacts["prune-channels"] = {
            "layers": rows,
            "groups": [
                {"name": g.name, "layers": g.layers, "before": g.size, "after": int(keep[g.classes].sum()),
                 "fixed": sorted({r.key for r in g.fixed.values()})}
                for g in cg.groups if g.layers
            ],
            "unprunable": details,
        }
        return PassResult(True, stats)


def _analysis_shapes(skeleton, ctx: PassContext) -> dict[str, tuple[int, ...]]:
    """Input shapes for the MAC analysis: ``ctx.input_shapes``, else a dynamic *batch* dim counts as 1 (fractions of
    MACs do not depend on it); other dynamic dims must be given."""
    from onnxopt.shapes import graph_inputs

    out: dict[str, tuple[int, ...]] = {}
    given = dict(ctx.input_shapes or {})
    for spec in graph_inputs(skeleton):
        if spec.name in given:
            out[spec.name] = tuple(given[spec.name])
        elif not spec.is_static:
            dims = [d if isinstance(d, int) else (1 if i == 0 else None) for i, d in enumerate(spec.shape)]
            if any(d is None for d in dims):
                raise PreconditionError(f"input {spec.name!r} has dynamic dims {list(spec.shape)}; "
                                        "give them with --input-shape")
            out[spec.name] = tuple(dims)  # type: ignore[arg-type]
    return out

