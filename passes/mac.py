"""``mac``: count MACs, FLOPs, parameters and memory (an analysis pass: the graph is never changed)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxopt.pass_base import Pass, PassContext, PassResult, option


@dataclass(frozen=True)
class MacOptions:
    top: int = option(3, help="How many of the largest layers (by MACs) to name in the stats.")


class Mac(Pass):
    """Count MACs (Conv/Gemm/MatMul/Einsum), other FLOPs, parameters (PyTorch convention), weight and activation bytes.

    The full report (per layer, per op type, peak activation memory) goes to ``ctx.artifacts["mac"]`` (an
    ``onnxopt.analysis.Analysis``); the headline figures go to the stats. Dynamic input dims need ``--input-shape``.
    Definitions and unit costs: the docstring of ``onnxopt.analysis``.
    """

    name = "mac"
    Options = MacOptions
    kind = "analysis"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        from onnxopt.errors import PreconditionError

        missing = [
            f"{t.name}{list(t.shape) if t.shape is not None else '[?]'}" for t in graph.inputs
            if isinstance(t, gs.Variable) and (t.shape is None or not all(isinstance(d, int) for d in t.shape))
            and t.name not in ctx.input_shapes
        ]
        if missing:
            raise PreconditionError(
                "dynamic input dims: " + ", ".join(missing) + "; give them with --input-shape NAME=DIMS"
            )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from onnxopt.analysis import analyze, applicable_shapes
        from onnxopt.model import graph_skeleton

        # The skeleton keeps every dim and the small constants; the analysis reads nothing else.
        model = graph_skeleton(graph, ctx.template)
        a = analyze(model, applicable_shapes(model, ctx.input_shapes))
        ctx.artifacts["mac"] = a
        t = a.totals()
        order = ("macs", "params", "flops", "peak_activation_bytes", "buffers", "constants", "weight_bytes", "nodes")
        stats: dict[str, int | float | str] = {k: t[k] for k in order if t[k] is not None}
        if a.peak is not None:
            stats["peak_node"] = a.peak.node
        if not a.complete:
            stats.update(macs_known=t["macs_known"], flops_known=t["flops_known"], unknown_nodes=t["unknown_nodes"])
        top = [layer for layer in a.top(self.options.top) if layer.macs]
        if top:
            stats["top_layers"] = ", ".join(f"{layer.name}={layer.macs}" for layer in top)
        if not a.complete:
            u = a.unknown[0]
            stats["unknown_example"] = f"{u.name} ({u.op_type}): {u.note}"
        return PassResult(changed=False, stats=stats)
