"""Benchmark: load -> fold BatchNorm + cleanup -> save on a ResNet-50 with unfused BatchNorm.

Compares, in one run and on the same file: bare load+save (onnx), onnxopt (fold-bn + cleanup), onnxslim and onnxsim.
Each tool's time is the median of --repeats runs of the whole file-to-file job. onnxopt runs without its ONNX Runtime
validation here (the peers do not validate either); the validation that `onnxopt run` does by default is timed
separately and its result (rel L2 against the original) is printed.

    python bench/bench_fold.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

from _common import median_time, resnet50_file


def count(model_path: Path, op: str) -> int:
    return sum(n.op_type == op for n in onnx.load(str(model_path), load_external_data=False).graph.node)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import onnxopt
    from onnxopt.validate import output_metrics, random_inputs, run, session

    src = resnet50_file("bench_fold_")
    work = src.parent
    print(f"model: zoo ResNet-50, {src.stat().st_size / 2**20:.1f} MiB, {count(src, 'BatchNormalization')} BN, "
          f"{count(src, 'Conv')} Conv, {len(onnx.load(str(src)).graph.node)} nodes")

    def bare():
        m = onnx.load(str(src))
        onnx.save_model(m, str(work / "bare.onnx"))

    def ours():
        m = onnxopt.load(src)
        res = onnxopt.optimize(m, [onnxopt.create_pass("fold-bn"), onnxopt.create_pass("cleanup")], validate=False)
        res.save(work / "onnxopt.onnx")

    results: dict[str, float] = {}
    results["bare load+save"] = median_time(bare, args.repeats)
    results["onnxopt fold-bn+cleanup"] = median_time(ours, args.repeats)
    try:
        import onnxslim

        def slim():
            m = onnxslim.slim(str(src))
            onnx.save_model(m, str(work / "onnxslim.onnx"))

        results["onnxslim"] = median_time(slim, args.repeats)
    except ImportError:
        print("onnxslim not installed (pip install onnxslim)")
    try:
        import onnxsim

        def sim():
            m, ok = onnxsim.simplify(onnx.load(str(src)))
            assert ok
            onnx.save_model(m, str(work / "onnxsim.onnx"))

        results["onnxsim"] = median_time(sim, args.repeats)
    except ImportError:
        print("onnxsim not installed (pip install onnxsim)")

    # onnxopt's default validation, timed on its own, and the accuracy of the result.
    original = onnx.load(str(src))
    feeds = random_inputs(original, seed=0)
    t0 = time.perf_counter()
    ref = run(session(original), feeds)
    new = run(session(onnx.load(str(work / "onnxopt.onnx"))), feeds)
    t_val = time.perf_counter() - t0
    m = output_metrics("logits", ref["logits"], new["logits"])

    base = results["bare load+save"]
    slim_t = results.get("onnxslim")
    print(f"\n{'tool':28s} {'median s':>9s} {'x bare':>7s} {'x onnxslim':>10s} {'BN after':>8s} {'nodes after':>11s}")
    files = {"bare load+save": "bare", "onnxopt fold-bn+cleanup": "onnxopt", "onnxslim": "onnxslim", "onnxsim": "onnxsim"}
    for name, t in results.items():
        f = work / f"{files[name]}.onnx"
        nodes = len(onnx.load(str(f), load_external_data=False).graph.node)
        ratio_slim = f"{t / slim_t:10.2f}" if slim_t else f"{'-':>10s}"
        print(f"{name:28s} {t:9.3f} {t / base:7.2f} {ratio_slim} {count(f, 'BatchNormalization'):8d} {nodes:11d}")
    print(f"\nonnxopt validation (ORT, optimizations off, both models): {t_val:.3f} s; "
          f"rel L2 {m.rel_l2:.2e}, max abs {m.max_abs:.2e}, cosine {m.cosine:.9f}")
    ours_t = results["onnxopt fold-bn+cleanup"]
    print(f"targets: onnxopt/onnxslim = {ours_t / slim_t:.2f} (<= 0.5)" if slim_t else "targets: onnxslim missing")
    print(f"         onnxopt/bare    = {ours_t / base:.2f} (<= 1.5)")
    print(f"         rel L2          = {m.rel_l2:.2e} (<= 1e-6)")
    print(f"versions: onnx {onnx.__version__}, numpy {np.__version__}"
          + (f", onnxslim {onnxslim.__version__}" if slim_t else "")
          + (f", onnxsim {onnxsim.__version__}" if "onnxsim" in results else ""))


if __name__ == "__main__":
    main()
