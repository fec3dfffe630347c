"""A small third-party pass: rewrite Relu as Clip(min=0) — exact, and easy to check."""

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import Pass, PassResult, option


@dataclass(frozen=True)
class ReluToClipOptions:
    max_nodes: int = option(-1, help="Rewrite at most this many Relu nodes (-1: all).")


class ReluToClip(Pass):
    """Rewrite Relu as Clip(min=0)."""

    name = "relu-to-clip"
    Options = ReluToClipOptions

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        done = 0
        for node in graph.nodes:
            if node.op != "Relu" or (0 <= self.options.max_nodes <= done):
                continue
            zero = gs.Constant(f"{node.name or 'relu'}_clip_min_{done}", np.zeros((), dtype=np.float32))
            node.op = "Clip"
            node.inputs = [node.inputs[0], zero]
            done += 1
        return PassResult(changed=done > 0, stats={"rewritten": done})
