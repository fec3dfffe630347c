"""Benchmark: latency of ONNX Runtime and OpenVINO (CPU), float and int8 QDQ, on the digits ResNet and zoo ResNet-18.

Every runner is timed in the same run: four sweeps over the runners, each timing a block of consecutive inferences per
runner after a warm-up; the figure is the median of all timed runs (>= 20), in milliseconds, host to host, batch 1
(the minimum is shown too: on a shared machine it is what the runtime does undisturbed).

The int8 models come from onnxopt's own pipeline (fold-bn, then quantize) in its two flavours: ``target=tensorrt``
(int8 activations with zero point 0, Q/DQ on the compute inputs only) and ``target=onnxruntime`` (uint8 activations,
outputs quantized too, int32 bias: the layout ONNX Runtime's integer kernels fuse). Accuracy is given beside the
latency: for digits, test-set top-1 (400 images) and the rel L2 error of the logits vs the float model in ONNX Runtime
(graph optimizations off); for ResNet-18 (random weights, calibrated on random data, so only agreement with the float
model is meaningful), rel L2 and top-1 agreement vs the float model on 16 random inputs.

Also: the accuracy of ``convert-precision:to=fp16`` (rel L2 vs float32 in ONNX Runtime; digits top-1).

    python bench/bench_backends.py [--repeats 60] [--write]   # --write updates bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## Back-ends (bench_backends.py)"


def quantized(model, calib, target: str):
    from onnxopt.optimize import optimize
    from onnxopt.pass_base import PassContext
    from onnxopt.pipeline import from_specs
    from onnxopt.registry import load_registry

    ctx = PassContext(seed=0)
    ctx.calibration = calib
    passes = from_specs(["fold-bn", f"quantize:target={target},check=false"], load_registry())
    return optimize(model, passes, ctx=ctx, validate=False).model


def timed_blocks(runners: dict, feeds, repeats: int, warmup: int, passes: int = 4) -> dict:
    """(median, min) latency in ms of each runner: ``passes`` sweeps over the runners, each timing a block of
    ``repeats / passes`` consecutive runs after ``warmup`` untimed ones. (Alternating runners run by run made
    OpenVINO 5-10x slower here: two runtimes' thread pools waking up in turn on 2 cores.)"""
    times: dict[str, list[float]] = {k: [] for k in runners}
    per_pass = -(-repeats // passes)
    for _ in range(passes):
        for k, r in runners.items():
            for _ in range(warmup):
                r.run(feeds)
            for _ in range(per_pass):
                t0 = time.perf_counter()
                r.run(feeds)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: (float(np.median(v)), float(np.min(v))) for k, v in times.items()}


def bench_model(name, model, calib, eval_batches, labels, repeats, warmup):
    """Rows for one model. ``eval_batches``: feed dicts for the accuracy (outputs concatenated); the first sample of
    the first batch is the latency input."""
    from onnxopt.backends import get_backend
    from onnxopt.validate import output_metrics, run, session

    variants = {"float": model}
    t0 = time.perf_counter()
    for target in ("tensorrt", "onnxruntime"):
        variants[f"int8 (target={target})"] = quantized(model, calib, target)
    print(f"{name}: quantized in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    first = eval_batches[0]
    one = {k: v[:1] for k, v in first.items()}
    sess = session(model)
    out_name = sess.get_outputs()[0].name
    ref = np.concatenate([run(sess, f)[out_name] for f in eval_batches])
    runners, acc = {}, {}
    for backend in ("onnxruntime", "openvino"):
        be = get_backend(backend)
        for variant, m in variants.items():
            art = be.build(m)
            runner = be.runner(art)
            key = (backend, variant)
            runners[key] = runner
            logits = np.concatenate([runner.run(f)[out_name] for f in eval_batches])
            if labels is not None:
                rel = output_metrics(out_name, ref, logits).rel_l2
                acc[key] = f"top-1 {100 * np.mean(logits.argmax(1) == labels):.2f} %, rel L2 vs float ORT {rel:.2g}"
            else:
                rel = output_metrics(out_name, ref, logits).rel_l2
                agree = 100 * np.mean(logits.argmax(1) == ref.argmax(1))
                acc[key] = f"rel L2 {rel:.3g}, top-1 agreement {agree:.0f} %"
            if "int8" in variant and backend == "openvino":
                acc[key] += f", {art.info['int8_layers']} int8 layers"
    lat = timed_blocks(runners, one, repeats, warmup)
    rows = []
    for (backend, variant), (ms, fastest) in lat.items():
        base = lat[(backend, "float")][0]
        rows.append((name, backend, variant, ms, fastest, base / ms, acc[(backend, variant)]))
    return rows


def fp16_rows():
    from models.zoo import ZOO
    from onnxopt.model import load
    from onnxopt.optimize import optimize
    from onnxopt.registry import load_registry
    from onnxopt.validate import output_metrics, random_inputs, run, session

    reg = load_registry()
    rows = []
    data = np.load(ROOT / "models" / "digits.npz")
    m = load(ROOT / "models" / "digits_resnet.onnx")
    new = optimize(m, [reg.create("convert-precision")], validate=False).model
    x = {"input": data["test_input"]}
    ref, out = run(session(m), x)["logits"], run(session(new), x)["logits"]
    rows.append(("digits (400 test images)", f"{output_metrics('logits', ref, out).rel_l2:.2e}",
                 f"top-1 {100 * np.mean(ref.argmax(1) == data['test_labels']):.2f} % -> "
                 f"{100 * np.mean(out.argmax(1) == data['test_labels']):.2f} %, "
                 f"{int(np.sum(ref.argmax(1) != out.argmax(1)))} predictions changed"))
    for name in ("resnet18", "resnet50", "mobilenetv2", "yolo", "unet"):
        m = ZOO[name](batch=1, height=224 if name != "yolo" else 256, width=224 if name != "yolo" else 256, seed=0)
        new = optimize(m, [reg.create("convert-precision")], validate=False).model
        feeds = random_inputs(m, seed=0)
        ref, out = run(session(m), feeds), run(session(new), feeds)
        worst = max(output_metrics(k, ref[k], out[k]).rel_l2 for k in ref)
        rows.append((f"{name} ({'x'.join(map(str, feeds['input'].shape))}, random weights)", f"{worst:.2e}",
                     f"{sum(n.op_type == 'Cast' for n in new.graph.node)} Casts (graph I/O only)"))
    return rows


def notes(rows) -> list[str]:
    """The honest part: where int8 is not faster than float on this CPU, and why."""
    out = []
    slow = [(m, b, v, s) for m, b, v, _, _, s, _ in rows if "int8" in v and s < 1.0]
    for m, b, v, s in slow:
        why = ("ONNX Runtime fuses a QDQ group into its integer kernels only when the op's output is quantized too "
               "(QLinearConv pattern); TensorRT-style QDQ (no Q on outputs) leaves DequantizeLinear + float Conv, "
               "i.e. float compute plus the (de)quantization work") if b == "onnxruntime" and "tensorrt" in v else (
               "On a model this small the per-call overhead and the (de)quantization of activations outweigh the "
               "cheaper int8 arithmetic")
        out.append(f"- **int8 is not faster** for {m} on {b} with {v}: {s:.2f}x the float latency. {why}.")
    if not slow:
        out.append("- int8 was faster than float for every runtime and model in this run.")
    noisy = [(m, b, v, ms, lo) for m, b, v, ms, lo, _, _ in rows if ms > 3 * lo]
    if noisy:
        worst = max(noisy, key=lambda r: r[3] / r[4])
        out.append(f"- {len(noisy)} of {len(rows)} medians are over 3x their minimum (worst: {worst[0]}, {worst[1]} "
                   f"{worst[2]}: median {worst[3]:.3f} ms, min {worst[4]:.3f} ms): those runners were slowed by the "
                   "other jobs on the two cores (OpenVINO's CPU threads suffer most); the min column shows what the "
                   "runtime does undisturbed.")
    out.append("- The CPU has AVX-512 VNNI (int8 dot products) but no AMX; a shared 2-core machine: other jobs were "
               "running (load average given above), so absolute figures move between runs; compare within a run.")
    return out


def render(rows, fp16, repeats, warmup, load) -> str:
    import onnxruntime
    import openvino

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        SECTION, "",
        f"`python bench/bench_backends.py --repeats {repeats} --write` — {cpu}, {os.cpu_count()} cores, "
        f"onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__.split('-')[0]}; batch 1, median of "
        f"{repeats} runs (four sweeps of blocks, {warmup} warm-up runs per block), ms host to host. Speed-up is vs the same runtime's "
        f"float model. Load average at start/end: {load[0]:.1f} / {load[1]:.1f}.", "",
        "| model | runtime | precision | median ms | min ms | speed-up (median) | accuracy |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    lines += [f"| {m} | {b} | {v} | {ms:.3f} | {lo:.3f} | {s:.2f}x | {a} |" for m, b, v, ms, lo, s, a in rows]
    lines += [""] + notes(rows)
    lines += ["", "convert-precision:to=fp16, run in ONNX Runtime CPU (graph optimizations off) vs the float32 model:", "",
              "| model | rel L2 vs float32 | notes |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in fp16]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in old:
        start = old.index(SECTION)
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("\n" + old[nxt + 1:] if nxt != -1 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=60, help="timed runs per runner (>= 20)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--write", action="store_true", help="update the section in bench/RESULTS.md")
    args = ap.parse_args()
    if args.repeats < 20:
        ap.error("--repeats must be >= 20")

    from models.zoo import build_resnet18
    from onnxopt.calibration import open_calibration
    from onnxopt.model import load

    rows = []
    load_start = os.getloadavg()[0]
    digits = load(ROOT / "models" / "digits_resnet.onnx")
    data = np.load(ROOT / "models" / "digits.npz")
    calib = open_calibration(str(ROOT / "models" / "digits.npz"), model=digits, batch_size=50)
    rows += bench_model("digits ResNet (1x1x32x32)", digits, calib, [{"input": data["test_input"]}],
                        data["test_labels"], args.repeats, args.warmup)
    r18 = build_resnet18(batch=1, height=224, width=224, seed=0)
    calib = open_calibration(None, model=r18, random=True, samples=32, seed=0)
    x = np.random.default_rng(1).standard_normal((16, 1, 3, 224, 224)).astype(np.float32)
    rows += bench_model("zoo ResNet-18 (1x3x224x224)", r18, calib, [{"input": xi} for xi in x], None,
                        args.repeats, args.warmup)
    fp16 = fp16_rows()
    text = render(rows, fp16, args.repeats, args.warmup, (load_start, os.getloadavg()[0]))
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
