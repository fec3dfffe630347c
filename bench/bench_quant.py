#!/usr/bin/env python
"""INT8 calibration + quantization: onnxopt vs ONNX Runtime's ``quantize_static``, in one run.

1. Zoo ResNet-18 (batch 1, 3x224x224 by default) with 256 seeded calibration samples, entropy calibration, per-channel
   weights, QDQ format. Each tool runs in its own subprocess, which reports its own peak RSS
   (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and wall time (from the child's start, imports included); the
   bare forward and onnxopt run ``--repeats`` times, alternating, and their fastest run counts (shared machine):

   * ``onnxopt``: ``onnxopt run resnet18.onnx -p fold-bn -p quantize:method=entropy,check=false --calib calib.npz
     --no-validate`` (the model as exported, BN folded by the pipeline);
   * ``ort``: ``quantize_static(resnet18_folded.onnx, ..., CalibrationMethod.Entropy, per_channel=True,
     quant_format=QuantFormat.QDQ)`` on the same model with BN already folded, reading the same samples from a
     memory-mapped .npy one at a time;
   * ``bare``: a plain ONNX Runtime session (default options) running the float model over the same samples.

   Targets (issue 5): onnxopt peak RSS <= 1 GB and <= 0.25x ORT's; time <= 0.5x ORT's and <= 1.3x the bare forward.

2. The digits ResNet (models/digits_resnet.onnx, calibration split of models/digits.npz): top-1 accuracy on the
   held-out test split of the float model and of each tool's int8 model, in ONNX Runtime with optimizations off
   (reference semantics) and with ORT_ENABLE_ALL (deployment: its integer kernels where the graph allows).

Usage (from the repository root)::

    python bench/bench_quant.py                   # the issue's setup: 224x224, 256 samples
    python bench/bench_quant.py --size 112 --samples 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# -- children ----------------------------------------------------------------------------------------------------------

def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class _NpyReader:
    """ORT calibration reader streaming samples from a memory-mapped .npy, one at a time."""

    def __init__(self, path: str, name: str) -> None:
        import numpy as np

        self.data = np.load(path, mmap_mode="r")
        self.name, self.i = name, 0

    def get_next(self):
        import numpy as np

        if self.i >= len(self.data):
            return None
        x = np.ascontiguousarray(self.data[self.i:self.i + 1])
        self.i += 1
        return {self.name: x}

    def __len__(self) -> int:
        return len(self.data)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.i = start_index


def child(kind: str, d: Path) -> None:
    if kind == "onnxopt":
        from onnxopt.cli import main

        try:
            main(["run", str(d / "resnet18.onnx"), "-p", "fold-bn", "-p", "quantize:method=entropy,check=false",
                  "--calib", str(d / "calib.npz"), "--no-validate", "-q", "-o", str(d / "onnxopt_int8.onnx")])
        except SystemExit as e:
            if e.code:
                raise
    elif kind == "ort":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        quantize_static(str(d / "resnet18_folded.onnx"), str(d / "ort_int8.onnx"),
                        _NpyReader(str(d / "calib.npy"), "input"), quant_format=QuantFormat.QDQ, per_channel=True,
                        calibrate_method=CalibrationMethod.Entropy)
    elif kind == "bare":
        import numpy as np
        import onnxruntime as ort

        sess = ort.InferenceSession(str(d / "resnet18.onnx"), providers=["CPUExecutionProvider"])
        data = np.load(d / "calib.npy", mmap_mode="r")
        for i in range(len(data)):
            sess.run(None, {"input": np.ascontiguousarray(data[i:i + 1])})
    else:
        raise SystemExit(f"unknown child {kind}")
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": time.perf_counter() - T0, "cpu_seconds": ru.ru_utime + ru.ru_stime,
                      "peak_rss_mb": _peak_rss_mb()}))


def run_child(kind: str, d: Path) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--child", kind, "--dir", str(d)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{kind} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall"] = time.perf_counter() - t
    return out


# -- digits --------------------------------------------------------------------------------------------------------------

def digits_table(d: Path) -> list[tuple[str, float, float]]:
    import numpy as np
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from onnxopt.calibration import open_calibration
    from onnxopt.model import load, save
    from onnxopt.pass_base import PassContext
    from onnxopt.pass_manager import PassManager
    from onnxopt.registry import load_registry
    from onnxopt.validate import run, session

    reg = load_registry()
    data = np.load(ROOT / "models" / "digits.npz")
    x, y, calib = data["test_input"], data["test_labels"], data["calib_input"]
    m = load(ROOT / "models" / "digits_resnet.onnx")
    folded, _ = PassManager([reg.create("fold-bn")]).run(m, PassContext())
    save(folded, d / "digits_folded.onnx")

    def acc(model, opt):
        return float(np.mean(run(session(model, optimize=opt), {"input": x})["logits"].argmax(1) == y))

    rows = [("float", acc(m, False), acc(m, True))]
    for target in ("tensorrt", "onnxruntime"):
        ctx = PassContext(calibration=open_calibration(ROOT / "models" / "digits.npz", model=m))
        q, _ = PassManager([reg.create("fold-bn"), reg.create("quantize", method="entropy", target=target,
                                                               check=False)]).run(m, ctx)
        rows.append((f"onnxopt entropy, target={target}", acc(q, False), acc(q, True)))

    class Reader:
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(calib):
                return None
            self.i += 1
            return {"input": calib[self.i - 1:self.i]}

    for method in (CalibrationMethod.Entropy, CalibrationMethod.MinMax):
        out = d / f"digits_ort_{method.name}.onnx"
        quantize_static(str(d / "digits_folded.onnx"), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, calibrate_method=method)
        rows.append((f"ORT quantize_static {method.name}, per-channel, QDQ", acc(str(out), False),
                     acc(str(out), True)))
    return rows


# -- main ----------------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--child")
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--skip-ort", action="store_true", help="skip ORT's quantize_static on ResNet-18 (memory)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of bare and onnxopt (alternating; fastest counts)")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.dir)
        return

    import numpy as np

    from models.zoo import build_resnet18
    from onnxopt.model import save
    from onnxopt.pass_base import PassContext
    from onnxopt.pass_manager import PassManager
    from onnxopt.registry import load_registry

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    import onnxruntime

    print(f"# machine: {cpu}, {os.cpu_count()} CPUs, VNNI: {'yes' if vnni else 'no'}, Python "
          f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}; load average at start "
          f"{os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        d = Path(tmp)
        m = build_resnet18(1, args.size, args.size, 0)
        save(m, d / "resnet18.onnx")
        folded, _ = PassManager([load_registry().create("fold-bn")]).run(m, PassContext())
        save(folded, d / "resnet18_folded.onnx")
        rng = np.random.default_rng(0)
        calib = rng.standard_normal((args.samples, 3, args.size, args.size), dtype=np.float32)
        np.save(d / "calib.npy", calib)
        np.savez(d / "calib.npz", input=calib)
        del calib
        print(f"# ResNet-18 1x3x{args.size}x{args.size}, {args.samples} calibration samples, entropy, per-channel, QDQ")
        # bare and onnxopt alternate (ABAB...) and the fastest of each counts: the machine is shared, so a single
        # timing can be slowed by other jobs; ORT's quantize_static runs once.
        runs: dict[str, list[dict]] = {"bare": [], "onnxopt": []}
        for _ in range(args.repeats):
            for kind in runs:
                runs[kind].append(run_child(kind, d))
        res = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
        for k, v in runs.items():
            res[k]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in v)
            print(f"# {k}: wall " + ", ".join(f"{r['seconds']:.1f}" for r in v) + " s; CPU "
                  + ", ".join(f"{r['cpu_seconds']:.1f}" for r in v) + " s")
        if not args.skip_ort:
            res["ort"] = run_child("ort", d)
        sizes = {k: (d / f).stat().st_size for k, f in (("float", "resnet18.onnx"), ("onnxopt", "onnxopt_int8.onnx"))}
        if "ort" in res:
            sizes["ort"] = (d / "ort_int8.onnx").stat().st_size
        print("\n| run | wall time (s) | CPU time (s) | peak RSS (MB) | model size (MB) |\n|---|---:|---:|---:|---:|")
        names = {"bare": "bare ORT forward (float)", "onnxopt": "onnxopt fold-bn + quantize",
                 "ort": "ORT quantize_static"}
        for k, r in res.items():
            size = f"{sizes[k if k != 'bare' else 'float'] / 1e6:.1f}"
            print(f"| {names[k]} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {size} |")
        o = res["onnxopt"]
        print("\n| target | measured | ok |\n|---|---:|:-:|")
        print(f"| onnxopt peak RSS <= 1 GB | {o['peak_rss_mb']:.0f} MB | {'yes' if o['peak_rss_mb'] <= 1024 else 'NO'} |")
        tb = o["seconds"] / res["bare"]["seconds"]
        if "ort" in res:
            rr = o["peak_rss_mb"] / res["ort"]["peak_rss_mb"]
            tr = o["seconds"] / res["ort"]["seconds"]
            print(f"| RSS <= 0.25x ORT's | {rr:.3f}x | {'yes' if rr <= 0.25 else 'NO'} |")
            print(f"| time <= 0.5x ORT's | {tr:.3f}x | {'yes' if tr <= 0.5 else 'NO'} |")
        print(f"| time <= 1.3x bare forward | {tb:.2f}x | {'yes' if tb <= 1.3 else 'NO'} |")
        cb = o["cpu_seconds"] / res["bare"]["cpu_seconds"]
        print(f"| (CPU time vs bare forward, less sensitive to other jobs) | {cb:.2f}x | {'yes' if cb <= 1.3 else 'NO'} |")

        print("\n# digits ResNet: top-1 accuracy on the 400 held-out test images")
        print("\n| model | ORT optimizations off (reference) | ORT_ENABLE_ALL (deployment) |\n|---|---:|---:|")
        for name, ref, dep in digits_table(d):
            print(f"| {name} | {100 * ref:.2f}% | {100 * dep:.2f}% |")
    print(f"\n# total bench time {time.perf_counter() - T0:.0f} s; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
