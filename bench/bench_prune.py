"""Benchmark of channel pruning (``prune-channels``), in one run:

1. ResNet-50 (zoo, 1x3x224x224, random weights) at ``target_macs=0.5``: Conv/Gemm MACs after/before, ONNX Runtime CPU
   latency pruned/unpruned (median over interleaved repeats, both sessions with ORT's full graph optimizations and the
   same thread count), and the pass's own time against a bare ``onnxopt.load`` + ``onnxopt.save`` of the same file
   (medians of --repeats). Latency: --runs alternating single runs of each model after a warm-up; the median
   of each, and the median of the per-pair ratios.
2. The trained digits ResNet (``models/digits_resnet.onnx``) at ``ratio=0.25``: top-1 accuracy on the test split with
   ``recover=lstsq`` (calibrated on the calibration split only), ``recover=bias`` (data-free) and ``recover=none``,
   for ``importance=l1`` and ``importance=random``; with the default ``round_to=8`` and with ``round_to=1``.

3. Every zoo model at ``ratio=0.3`` (MACs predicted vs measured), and ``prune-blocks:count=2`` on ResNet-50.

    python bench/bench_prune.py [--repeats 5] [--part all|resnet50|digits|zoo|blocks]

Targets (issue 4): latency ratio <= 0.6, pass time <= 3x load+save, lstsq beats no recovery.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from _common import ROOT, median_time, resnet50_file


def ort_session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def bench_resnet50(repeats: int, threads: int, runs: int) -> dict:
    import onnxopt
    from onnxopt.pass_base import PassContext
    from onnxopt.pass_manager import PassManager

    src = resnet50_file("bench_prune_")
    work = src.parent

    def load_save():
        onnxopt.save(onnxopt.load(src), work / "copy.onnx")

    t_io = median_time(load_save, repeats)
    model = onnxopt.load(src)
    pass_times, records = [], []
    for _ in range(repeats):
        ctx = PassContext()
        pruned, record = PassManager([onnxopt.create_pass("prune-channels", target_macs=0.5)]).run(model, ctx)
        pass_times.append(record.passes[0].seconds)
        records.append((record.passes[0].stats, ctx.artifacts["prune-channels"]))
    t_pass = statistics.median(pass_times)
    stats, art = records[-1]

    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    s_base, s_pruned = ort_session(model, threads), ort_session(pruned, threads)
    for s in (s_base, s_pruned):  # warm up
        for _ in range(3):
            s.run(None, feeds)
    base, small = [], []
    for _ in range(runs):  # alternating single runs, so both see the same machine load
        t0 = time.perf_counter()
        s_base.run(None, feeds)
        t1 = time.perf_counter()
        s_pruned.run(None, feeds)
        t2 = time.perf_counter()
        base.append(t1 - t0)
        small.append(t2 - t1)
    lat_base, lat_pruned = statistics.median(base), statistics.median(small)
    pair_ratio = statistics.median([b2 / b1 for b1, b2 in zip(base, small)])
    kept = [g["after"] for g in art["groups"]]
    return {
        "macs_before": stats["macs_before"], "macs_after": stats["macs_after"],
        "macs_ratio": stats["macs_after"] / stats["macs_before"],
        "params_before": stats["params_before"], "params_after": stats["params_after"],
        "all_multiple_of_8": all(k % 8 == 0 for k in kept), "groups_pruned": stats["groups_pruned"],
        "latency_base_ms": lat_base * 1e3, "latency_pruned_ms": lat_pruned * 1e3, "latency_ratio": lat_pruned / lat_base,
        "latency_pair_ratio": pair_ratio, "runs": runs,
        "pass_s": t_pass, "load_save_s": t_io, "pass_over_io": t_pass / t_io, "threads": threads,
    }


def bench_digits() -> list[dict]:
    import onnxopt
    from onnxopt.calibration import open_calibration
    from onnxopt.pass_base import PassContext
    from onnxopt.pass_manager import PassManager
    from onnxopt.validate import run, session

    model = onnxopt.load(ROOT / "models" / "digits_resnet.onnx")
    data = np.load(ROOT / "models" / "digits.npz")
    test_x, test_y = data["test_input"], data["test_labels"]

    def top1(m) -> float:
        return float((run(session(m), {"input": test_x})["logits"].argmax(1) == test_y).mean())

    rows = [{"setting": "unpruned", "top1": top1(model)}]
    for round_to in (8, 1):
        for importance in ("l1", "random"):
            for recover in ("none", "bias", "lstsq"):
                # calibration: the npz's calib_input split only (test_* arrays are never read by the pass)
                calib = open_calibration(ROOT / "models" / "digits.npz", model=model, batch_size=50)
                ctx = PassContext(calibration=calib, seed=0)
                p = onnxopt.create_pass("prune-channels", ratio=0.25, importance=importance, recover=recover,
                                        round_to=round_to)
                t0 = time.perf_counter()
                pruned, record = PassManager([p]).run(model, ctx)
                seconds = time.perf_counter() - t0
                st = record.passes[0].stats
                rows.append({
                    "setting": f"round_to={round_to} importance={importance} recover={recover}", "top1": top1(pruned),
                    "macs_ratio": st["macs_after"] / st["macs_before"],
                    "params_ratio": st["params_after"] / st["params_before"], "seconds": seconds,
                    "channels": st["channels"], "calib_samples": st.get("recover_samples"),
                })
    return rows


def bench_zoo() -> list[dict]:
    """prune-channels:ratio=0.3 on every zoo model (default resolutions): MACs predicted from the kept channel counts
    versus the MAC analysis of the pruned model, params, output cosine on a random input (recover=bias)."""
    import onnxopt
    from models.zoo import ZOO
    from onnxopt.pass_base import PassContext
    from onnxopt.pass_manager import PassManager
    from onnxopt.validate import output_metrics, random_inputs, run, session

    rows = []
    for name, builder in ZOO.items():
        model = builder(1)
        ctx = PassContext()
        pruned, record = PassManager([onnxopt.create_pass("prune-channels", ratio=0.3)]).run(model, ctx)
        st = record.passes[0].stats
        feeds = random_inputs(model, seed=0)
        ref, new = run(session(model), feeds), run(session(pruned), feeds)
        cos = min(output_metrics(k, ref[k], new[k]).cosine for k in ref)
        shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
        rows.append({"model": name, "input": "x".join(map(str, shape)), "macs_before": st["macs_before"],
                     "macs_after": st["macs_after"], "predicted": st["layer_macs_after"],
                     "params_before": st["params_before"], "params_after": st["params_after"],
                     "groups": f"{st['groups_pruned']}/{st['groups']}", "cosine": cos,
                     "seconds": record.passes[0].seconds})
    return rows


def bench_blocks() -> dict:
    """prune-blocks:count=2 on ResNet-50 224x224 (no calibration data: scored on seeded random inputs)."""
    import onnxopt
    from models.zoo import build_resnet50
    from onnxopt.pass_base import PassContext
    from onnxopt.pass_manager import PassManager

    model = build_resnet50(1, 224, 224)
    _, record = PassManager([onnxopt.create_pass("prune-blocks", count=2)]).run(model, PassContext())
    st = dict(record.passes[0].stats)
    st["seconds"] = record.passes[0].seconds
    return st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for the latency runs")
    ap.add_argument("--runs", type=int, default=40, help="alternating latency runs of each model")
    ap.add_argument("--part", choices=["all", "resnet50", "digits", "zoo", "blocks"], default="all")
    args = ap.parse_args()

    if args.part in ("all", "resnet50"):
        r = bench_resnet50(args.repeats, args.threads, args.runs)
        print("ResNet-50 224x224, prune-channels:target_macs=0.5")
        print(f"  MACs {r['macs_before']:,} -> {r['macs_after']:,}  ratio {r['macs_ratio']:.4f}  "
              f"(|ratio-0.5| = {abs(r['macs_ratio'] - 0.5):.4f}, target <= 0.025)")
        print(f"  params {r['params_before']:,} -> {r['params_after']:,}; groups pruned {r['groups_pruned']}; "
              f"every kept count a multiple of 8: {r['all_multiple_of_8']}")
        print(f"  ORT CPU latency ({r['threads']} thread(s), median of {r['runs']} alternating runs): unpruned "
              f"{r['latency_base_ms']:.2f} ms, pruned {r['latency_pruned_ms']:.2f} ms, ratio {r['latency_ratio']:.3f} "
              f"(median of per-pair ratios {r['latency_pair_ratio']:.3f}; target <= 0.6)")
        print(f"  pass {r['pass_s']:.3f} s vs load+save {r['load_save_s']:.3f} s: ratio {r['pass_over_io']:.2f} "
              f"(target <= 3)")
    if args.part in ("all", "zoo"):
        print("zoo models, prune-channels:ratio=0.3 (recover=bias)")
        for r in bench_zoo():
            print(f"  {r['model']:<12} {r['input']:<12} MACs {r['macs_before']:,} -> {r['macs_after']:,} "
                  f"(x{r['macs_after'] / r['macs_before']:.3f}; predicted from kept counts {r['predicted']:,}, "
                  f"equal: {r['predicted'] == r['macs_after']})  params {r['params_before']:,} -> "
                  f"{r['params_after']:,}  groups pruned {r['groups']}  min output cosine {r['cosine']:.3f}  "
                  f"pass {r['seconds']:.2f} s")
    if args.part in ("all", "blocks"):
        st = bench_blocks()
        print("ResNet-50 224x224, prune-blocks:count=2")
        print(f"  removed: {st['removed']}")
        print(f"  MACs {st['macs_before']:,} -> {st['macs_after']:,}; scored by {st['scored_by']}; "
              f"pass {st['seconds']:.2f} s")
        print(f"  why: {st['why']}")
    if args.part in ("all", "digits"):
        rows = bench_digits()
        base = rows[0]["top1"]
        print("digits ResNet, prune-channels:ratio=0.25, top-1 on the test split (400 images)")
        print(f"  unpruned: {base:.4f}")
        for r in rows[1:]:
            print(f"  {r['setting']:<48} top-1 {r['top1']:.4f}  MACs x{r['macs_ratio']:.3f}  "
                  f"params x{r['params_ratio']:.3f}  {r['seconds']:.1f} s")
        by = {r["setting"]: r["top1"] for r in rows[1:]}
        for rt in (8, 1):
            gain = by[f"round_to={rt} importance=l1 recover=lstsq"] - by[f"round_to={rt} importance=l1 recover=none"]
            print(f"  round_to={rt}: lstsq - none = {gain * 100:+.2f} points of top-1")


if __name__ == "__main__":
    main()
