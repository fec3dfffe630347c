"""Benchmark: the cleanup pass on ResNet-50 (models/zoo.py, 224x224, ~100 MB of weights), in memory.

Two graphs: ``clean`` (BatchNorm folded by fold-bn: nothing left for cleanup to do) and ``messy`` (the same model with
an Identity after every Conv, a PyTorch-style Shape->Gather->Unsqueeze->Concat->Reshape instead of Flatten, a
Constant-fed scale on the logits and a dead branch: work for every cleanup step). Timed, median of --repeats:

* ``onnxopt cleanup``: the pass alone (``Cleanup.run`` on an imported graph);
* ``onnxopt manager``: ``PassManager([cleanup]).run(model)`` (import, pass, invariant checks, export if changed);
* ``graphsurgeon``: ``fold_constants(); cleanup(); toposort()`` and export, the usual graphsurgeon recipe;
* ``onnxslim``: ``onnxslim.slim(model)`` (folding, dead code, dedup and its fusions).

    python bench/bench_cleanup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
from onnx import helper, numpy_helper

from _common import median_time


def messy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add work for every cleanup step to a clean model (see the module docstring)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes = []
    for n in g.node:
        if n.op_type == "Conv":
            out = n.output[0]
            n.output[0] = out + "_pre_identity"
            nodes += [n, helper.make_node("Identity", [n.output[0]], [out], name=n.name + "_identity")]
        elif n.op_type == "Flatten":
            x, y = n.input[0], n.output[0]
            p = n.name
            nodes += [
                helper.make_node("Shape", [x], [p + "_shape"], name=p + "_shape"),
                helper.make_node("Gather", [p + "_shape", p + "_zero"], [p + "_n"], name=p + "_gather", axis=0),
                helper.make_node("Unsqueeze", [p + "_n", p + "_axes"], [p + "_n1"], name=p + "_unsqueeze"),
                helper.make_node("Concat", [p + "_n1", p + "_minus1"], [p + "_target"], name=p + "_concat", axis=0),
                helper.make_node("Reshape", [x, p + "_target"], [y], name=p + "_reshape"),
            ]
            g.initializer.extend([
                numpy_helper.from_array(np.array(0, np.int64), p + "_zero"),
                numpy_helper.from_array(np.array([0], np.int64), p + "_axes"),
                numpy_helper.from_array(np.array([-1], np.int64), p + "_minus1"),
            ])
        else:
            nodes.append(n)
    logits = g.output[0].name
    nodes[-1].output[0] = logits + "_raw"
    nodes += [
        helper.make_node("Constant", [], ["scale_half"], name="scale_half", value_float=0.5),
        helper.make_node("Add", ["scale_half", "scale_half"], ["scale_one"], name="scale_fold"),
        helper.make_node("Mul", [logits + "_raw", "scale_one"], [logits], name="scale"),
        helper.make_node("Sigmoid", [logits + "_raw"], ["dead"], name="dead_branch"),
    ]
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import onnx_graphsurgeon as gs

    from models.zoo import build_resnet50
    from onnxopt import PassContext, PassManager, create_pass
    from onnxopt.validate import random_inputs, run, session

    base = build_resnet50(batch=1, height=224, width=224, seed=0)
    clean, _ = PassManager([create_pass("fold-bn")]).run(base, PassContext())
    graphs = {"clean": clean, "messy": messy(clean)}
    try:
        import onnxslim
    except ImportError:
        onnxslim = None
        print("onnxslim not installed (pip install onnxslim): its column is left out")

    print(f"ResNet-50 224x224, {sum(t.ByteSize() for t in clean.graph.initializer) / 1e6:.0f} MB of weights; "
          f"median of {args.repeats}")
    print(f"{'graph':6s} {'tool':18s} {'median s':>9s} {'x onnxslim':>10s} {'nodes after':>11s} {'changed':>8s}")
    for label, model in graphs.items():
        rows = {}

        def pass_alone(model=model):
            graph = gs.import_onnx(model)
            t0 = time.perf_counter()
            result = create_pass("cleanup").run(graph, PassContext())
            return time.perf_counter() - t0, result

        times = [pass_alone()[0] for _ in range(args.repeats)]
        _, result = pass_alone()
        rows["onnxopt cleanup"] = statistics.median(times)
        new, record = PassManager([create_pass("cleanup")]).run(model, PassContext())
        rows["onnxopt manager"] = median_time(
            lambda model=model: PassManager([create_pass("cleanup")]).run(model, PassContext()), args.repeats
        )

        def gs_recipe(model=model):
            graph = gs.import_onnx(model)
            graph.fold_constants().cleanup().toposort()
            return gs.export_onnx(graph)

        gs_out = gs_recipe()
        rows["graphsurgeon"] = median_time(gs_recipe, args.repeats)
        slim_out = None
        if onnxslim is not None:
            slim_out = onnxslim.slim(model)
            rows["onnxslim"] = median_time(lambda model=model: onnxslim.slim(model), args.repeats)
        feeds = random_inputs(model, seed=0)
        ref = run(session(model), feeds)
        out = run(session(new), feeds)
        err = max(float(np.max(np.abs(ref[k] - out[k]))) for k in ref)
        counts = {"onnxopt cleanup": len(new.graph.node), "onnxopt manager": len(new.graph.node),
                  "graphsurgeon": len(gs_out.graph.node), "onnxslim": len(slim_out.graph.node) if slim_out else 0}
        slim_t = rows.get("onnxslim")
        for tool, secs in rows.items():
            ratio = f"{secs / slim_t:10.3f}" if slim_t else f"{'-':>10s}"
            changed = str(result.changed) if tool.startswith("onnxopt") else ""
            print(f"{label:6s} {tool:18s} {secs:9.3f} {ratio} {counts[tool]:11d} {changed:>8s}")
        stats = {k: v for k, v in result.stats.items() if v}
        print(f"{label:6s} cleanup stats: {stats}; max |diff| vs original (ORT): {err:.2e}")


if __name__ == "__main__":
    main()
