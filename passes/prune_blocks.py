"""``prune-blocks``: depth pruning - remove whole residual branches ``y = x + f(x)`` so that the Add becomes ``y = x``.

Candidates are the Adds whose one operand ``x`` also feeds a closed branch ``f`` (its nodes read only ``x`` and
constants, and only the Add reads their results); projection shortcuts (a conv on the skip path) are not candidates.
Each candidate is scored by how much removing it alone changes the model's outputs (relative L2 over all outputs) on
calibration data, or - without calibration data - on seeded random inputs (the stats say which). The ``count`` lowest
scores are removed, or, with ``target_macs``, the lowest until the Conv/Gemm MACs reach that fraction of the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import OptionsError, PreconditionError
from onnxopt.graphutil import fresh_name
from onnxopt.pass_base import Pass, PassContext, PassResult, option
from onnxopt.progress import ProgressBar
from onnxopt.pruning import ResidualBranch, find_residual_branches, match_any


@dataclass(frozen=True)
class PruneBlocksOptions:
    count: int = option(0, help="Remove this many residual branches (the least damaging ones).")
    target_macs: Optional[float] = option(
        None, help="Remove the least damaging branches until the Conv/Gemm MACs reach this fraction of the original.")
    exclude: tuple[str, ...] = option((), help="Never remove a branch with a node matching one of these patterns.")
    samples: int = option(64, help="Samples used to score the branches (calibration data, else random inputs).")


class PruneBlocks(Pass):
    """Remove the residual branches whose removal changes the outputs least."""

    name = "prune-blocks"
    Options = PruneBlocksOptions
    kind = "lossy"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        o = self.options
        if o.count < 0:
            raise OptionsError(f"prune-blocks: count must be >= 0, got {o.count}")
        if o.target_macs is not None and not 0.0 < o.target_macs <= 1.0:
            raise OptionsError(f"prune-blocks: target_macs must be in (0, 1], got {o.target_macs}")
        if (o.count > 0) == (o.target_macs is not None):
            raise OptionsError("prune-blocks: give count= or target_macs= (one of them)")
        if o.samples < 1:
            raise OptionsError("prune-blocks: samples must be >= 1")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        branches, notes = find_residual_branches(graph)
        stats: dict = dict(notes)
        if o.exclude:
            kept = [b for b in branches if not any(match_any(n.name, o.exclude) for n in b.nodes + [b.add])]
            if len(kept) < len(branches):
                stats["skipped_excluded"] = len(branches) - len(kept)
            branches = kept
        stats["blocks_found"] = len(branches)
        if not branches:
            stats["skipped_no_residual_branch"] = 1
            return PassResult(False, stats)

        model = ctx.to_model(graph)
        shapes = _analysis_shapes(model, ctx)
        macs, params_before = _node_macs(model, shapes)
        base_macs = sum(macs.values())
        feeds, scored_by = _scoring_data(model, ctx, o.samples)
        stats["scored_by"] = scored_by
        scores = _score(model, branches, feeds, ctx.progress)
        order = sorted(range(len(branches)), key=lambda i: (scores[i], i))
        stats["scores"] = "; ".join(f"{branches[i].add.name}={scores[i]:.4g}" for i in order)

        chosen: list[int] = []
        if o.target_macs is not None:
            if base_macs <= 0:
                raise PreconditionError("prune-blocks: target_macs needs the Conv/Gemm MACs of the model")
            current = base_macs
            for i in order:
                if current <= o.target_macs * base_macs:
                    break
                chosen.append(i)
                current -= sum(macs.get(n.name, 0) for n in branches[i].nodes)
            if current > o.target_macs * base_macs:
                stats["target_not_reached"] = 1
        else:
            chosen = order[: o.count]
            if len(chosen) < o.count:
                stats["fewer_branches_than_count"] = o.count - len(chosen)
        if not chosen:
            stats["skipped_nothing_to_remove"] = 1
            return PassResult(False, stats)

        dropped: set[int] = set()
        for i in chosen:
            dropped |= _remove(graph, branches[i])
        graph.nodes = [n for n in graph.nodes if id(n) not in dropped]
        from onnxopt.pruning import reinfer_shapes

        skeleton = reinfer_shapes(graph, ctx.template)
        stats["blocks_removed"] = len(chosen)
        stats["removed"] = "; ".join(
            f"{branches[i].add.name} ({len(branches[i].nodes)} nodes, output change {scores[i]:.4g}, "
            f"rank {order.index(i) + 1}/{len(order)})" for i in chosen)
        stats["why"] = (f"lowest output change when removed alone, measured on {scored_by}; "
                        f"next candidate: {branches[order[len(chosen)]].add.name}={scores[order[len(chosen)]]:.4g}"
                        if len(chosen) < len(order) else f"all candidates removed ({scored_by})")
        if base_macs:
            after, params_after = _node_macs(skeleton, shapes)
            stats["macs_before"] = base_macs
            stats["macs_after"] = sum(after.values())
            stats["params_before"], stats["params_after"] = params_before, params_after
        return PassResult(True, stats)


def _analysis_shapes(model: onnx.ModelProto, ctx: PassContext) -> dict[str, tuple[int, ...]]:
    """Input shapes for the MAC analysis: ``ctx.input_shapes``, a dynamic dim otherwise counts as 1."""
    from onnxopt.shapes import graph_inputs

    shapes = {}
    for spec in graph_inputs(model):
        if spec.name in (ctx.input_shapes or {}):
            shapes[spec.name] = tuple(ctx.input_shapes[spec.name])
        elif not spec.is_static:
            shapes[spec.name] = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
    return shapes


def _node_macs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], int | None]:
    """Per-node MACs and the parameter count from the MAC analysis ({} and None when it cannot tell)."""
    from onnxopt.analysis import analyze

    try:
        a = analyze(model, shapes)
    except Exception:  # noqa: BLE001 - MACs only serve target_macs and the stats
        return {}, None
    return {layer.name: int(layer.macs or 0) for layer in a.layers}, a.params


def _scoring_data(model: onnx.ModelProto, ctx: PassContext, samples: int) -> tuple[list[dict], str]:
    if ctx.calibration is not None:
        from onnxopt.pruning_recover import calibration_batches

        feeds = list(calibration_batches(ctx.calibration, samples))
        n = sum(len(next(iter(f.values()))) for f in feeds)
        kind = "random calibration data" if getattr(ctx.calibration, "is_random", False) else "calibration data"
        return feeds, f"{kind} ({n} samples)"
    from onnxopt.shapes import graph_inputs
    from onnxopt.validate import random_inputs

    shapes = dict(ctx.input_shapes or {})
    for spec in graph_inputs(model):
        if spec.name not in shapes and not spec.is_static:
            shapes[spec.name] = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
    feeds = [random_inputs(model, shapes, seed=ctx.seed + i) for i in range(min(samples, 4))]
    return feeds, f"seeded random inputs ({len(feeds)} batches; no calibration data, a data-free proxy)"


def _gated(model: onnx.ModelProto, branches: list[ResidualBranch]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` where every candidate join ``x + f(x)`` becomes ``x + gate_i * f(x)`` with a scalar graph
    input ``gate_i``: one ONNX Runtime session then scores every candidate (gate_i = 0 removes branch i)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    taken = {n.name for n in g.node} | {t.name for t in g.initializer} | {vi.name for vi in g.input}
    taken |= {o for n in g.node for o in n.output}

    by_name = {n.name: n for n in g.node}
    gates = []
    new_nodes: dict[str, onnx.NodeProto] = {}
    for b in branches:
        dtype = b.branch_out.dtype if b.branch_out.dtype is not None else np.float32
        gate = fresh_name(f"{b.add.name}_gate", taken)
        g.input.append(onnx.helper.make_tensor_value_info(gate, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                          []))
        gated = fresh_name(f"{b.branch_out.name}_gated", taken)
        new_nodes[b.add.name] = onnx.helper.make_node("Mul", [b.branch_out.name, gate], [gated],
                                                      name=fresh_name(f"{b.add.name}_gate_mul", taken))
        add = by_name[b.add.name]
        for i, name in enumerate(add.input):
            if name == b.branch_out.name:
                add.input[i] = gated
        gates.append(gate)
    nodes = []
    for n in g.node:
        if n.name in new_nodes:
            nodes.append(new_nodes[n.name])
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return m, gates


def _score(model: onnx.ModelProto, branches: list[ResidualBranch], feeds: list[dict], progress: bool = False) -> list[float]:
    """Relative L2 change of all outputs (over all feeds) when each branch alone is removed."""
    from onnxopt.validate import session

    gated, gates = _gated(model, branches)
    sess = session(gated, optimize=True)
    names = [o.name for o in model.graph.output]
    dtypes = {i.name: i.type for i in sess.get_inputs()}

    def ones(off: int | None) -> dict[str, np.ndarray]:
        out = {}
        for j, gname in enumerate(gates):
            dt = np.float16 if "float16" in dtypes[gname] else (np.float64 if "double" in dtypes[gname] else np.float32)
            out[gname] = np.array(0.0 if j == off else 1.0, dtype=dt)
        return out

    refs = [sess.run(names, {**f, **ones(None)}) for f in feeds]
    denom = sum(float(np.sum(np.square(r.astype(np.float64)))) for outs in refs for r in outs) or 1.0
    scores = []
    with ProgressBar(progress, len(branches), "scoring residual branches") as bar:
        for i, b in enumerate(branches):
            bar.advance(0, b.add.name)
            err = 0.0
            for f, outs in zip(feeds, refs):
                new = sess.run(names, {**f, **ones(i)})
                err += sum(float(np.sum(np.square(n.astype(np.float64) - r))) for n, r in zip(new, outs))
            scores.append(float(np.sqrt(err / denom)))
            bar.advance(1)
    return scores


def _remove(graph: gs.Graph, b: ResidualBranch) -> set[int]:
    """Disconnect branch ``b`` (the Add becomes the identity); returns the ids of the nodes to drop."""
    out = b.add.outputs[0]
    dropped = {id(n) for n in b.nodes}
    if any(t.name == out.name for t in graph.outputs):
        b.add.op = "Identity"
        b.add.inputs = [b.skip]
    else:
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = b.skip
        b.add.outputs.clear()
        b.add.inputs.clear()
        dropped.add(id(b.add))
    for n in b.nodes:
        n.outputs.clear()
        n.inputs.clear()
    return dropped
