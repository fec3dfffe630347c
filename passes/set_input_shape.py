"""``set-input-shape``: fix dynamic input dims or change the input resolution, and propagate the shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.errors import OptionsError
from onnxopt.pass_base import Pass, PassContext, PassResult, option


@dataclass(frozen=True)
class SetInputShapeOptions:
    shapes: dict[str, str] = option(
        help="Input name -> dims joined by 'x' ('?' keeps a dim). CLI: shapes=input:1x3x720x1280[,mask:1x1x720x1280]; "
        "TOML: shapes = { input = \"1x3x720x1280\" }.",
        default_factory=dict,
    )


class SetInputShape(Pass):
    """Give graph inputs new shapes (fix dynamic dims; resolution scaling such as 1920x1080 -> 1280x720).

    Shapes are re-inferred from the new inputs (stale value_info and output shapes are replaced, so the graph outputs'
    shapes change with the inputs, by design). Constants that bake in a size derived from an input dim are updated when
    that is well defined: Reshape targets (a changed block of input dims mapped onto one target entry), Resize
    ``sizes`` (the ratio is kept), Slice ends equal to the old size, Expand targets; anything ambiguous (a Reshape that
    splits a changed dim, a fixed crop, a fixed-size Split or Resize ratio that is not an integer, a shape inference
    failure such as a fixed-length positional embedding) is refused with the node's name. Details:
    ``onnxopt.resolution``. When the shapes change, ``onnxopt run`` cannot compare the outputs with the original's and
    reports the run as not validated.
    """

    name = "set-input-shape"
    Options = SetInputShapeOptions
    kind = "exact"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if not self.options.shapes:
            raise OptionsError("set-input-shape needs shapes, e.g. -p set-input-shape:shapes=input:1x3x720x1280")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from onnxopt.model import graph_skeleton
        from onnxopt.resolution import plan_input_shapes

        plan = plan_input_shapes(graph_skeleton(graph, ctx.template), dict(self.options.shapes))
        if not plan.changed:
            return PassResult(False, {"skipped_same_shape": len(plan.new_inputs)})
        apply_plan(graph, plan)
        stats: dict[str, int | float | str] = dict(plan.stats)
        stats["inputs"] = ", ".join(
            f"{k}: {_fmt(plan.old_inputs[k])} -> {_fmt(v)}" for k, v in plan.new_inputs.items()
            if v != plan.old_inputs[k]
        )
        return PassResult(True, stats)


def _fmt(shape) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def apply_plan(graph: gs.Graph, plan) -> None:
    """Write a :class:`onnxopt.resolution.ShapePlan` into ``graph``: input shapes, new constants, inferred shapes."""
    from onnxopt.graphutil import constant_producer

    tensors = graph.tensors()
    for t in graph.inputs:
        if t.name in plan.new_inputs:
            t.shape = list(plan.new_inputs[t.name])
    for u in plan.updates:
        node = tensors[u.node_output].inputs[0]
        old = node.inputs[u.index]
        value = np.asarray(u.value)
        if u.new_name is not None or isinstance(old, gs.Constant):
            node.inputs[u.index] = gs.Constant(u.new_name or old.name, value)
        else:
            producer = constant_producer(old)
            assert producer is not None, f"{old.name} is not a constant"
            producer.attrs = {"value": gs.Constant(old.name, value)}
    inferred = plan.shapes()
    input_names = {t.name for t in graph.inputs}
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and name not in input_names:
            info = inferred.get(name)
            t.shape = list(info[1]) if info is not None and info[1] is not None else None
