"""Benchmark: MAC/parameter analysis of the zoo ResNet-50 (1x3x224x224, ~98 MiB), onnxopt vs onnx-tool.

Same file, same run, interleaved repetitions (the order alternates), median times:

* command line: ``python -m onnxopt.cli mac FILE`` vs ``python -m onnx_tool -i FILE`` (each prints its table; output
  discarded). This is the number the issue's target is about: onnxopt's time must be <= 1x onnx-tool's.
* library, in one process: onnxopt ``read_structure`` (the file without its weight data) + skeleton check +
  ``analyze`` vs onnx-tool ``Model`` + ``shape_infer`` + ``profile``.

Both tools' totals are printed: onnxopt reports Conv/Gemm MACs and PyTorch-convention parameters (4.09 G, 25.56 M);
onnx-tool mixes element-wise FLOPs into its MACs and counts BatchNorm running statistics as parameters.

    python bench/bench_mac.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys

from _common import ROOT, resnet50_file, timed


def interleaved(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Times of ``a`` and ``b`` run alternately (a b, b a, a b, ...), after one warm-up run of each."""
    a()
    b()
    ta, tb = [], []
    for i in range(repeats):
        if i % 2:
            tb.append(timed(b))
            ta.append(timed(a))
        else:
            ta.append(timed(a))
            tb.append(timed(b))
    return ta, tb


def line(label: str, ours: list[float], peer: list[float]) -> str:
    mo, mp = statistics.median(ours), statistics.median(peer)
    return (f"{label}: median onnxopt {mo:.3f} s, onnx-tool {mp:.3f} s, ratio {mo / mp:.2f}x "
            f"(min {min(ours):.3f} s vs {min(peer):.3f} s, ratio {min(ours) / min(peer):.2f}x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()

    src = resnet50_file("bench_mac_")
    print(f"model: zoo ResNet-50 1x3x224x224, {src.stat().st_size / 2**20:.1f} MiB; {args.repeats} repetitions; "
          f"load average at start {os.getloadavg()[0]:.1f}")

    # -- command line ---------------------------------------------------------------------------------------------
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ours_cmd = [sys.executable, "-m", "onnxopt.cli", "mac", str(src)]
    peer_cmd = [sys.executable, "-m", "onnx_tool", "-i", str(src)]

    def run(cmd):
        return lambda: subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)

    cli_ours, cli_peer = interleaved(run(ours_cmd), run(peer_cmd), args.repeats)

    # -- library ----------------------------------------------------------------------------------------------------
    import onnx_tool

    from onnxopt.analysis import analyze
    from onnxopt.skeleton import Skeleton, read_structure

    result: dict[str, object] = {}

    def ours():  # what `onnxopt mac` does before printing
        m, payloads = read_structure(src)
        skel = Skeleton(m, payloads)
        skel.check()
        result["ours"] = analyze(m, skeleton=skel)

    def peer():
        with contextlib.redirect_stdout(io.StringIO()):
            model = onnx_tool.Model(str(src))
            g = model.graph
            g.graph_reorder_nodes()
            g.shape_infer(None)
            g.profile()
        result["peer"] = (int(round(g.macs[0])), int(g.params))

    lib_ours, lib_peer = interleaved(ours, peer, args.repeats)

    a = result["ours"]
    peer_macs, peer_params = result["peer"]
    print(f"onnxopt  : MACs {a.macs:,}  params {a.params:,} (+ {a.buffers:,} BN running-stat buffers)  "
          f"FLOPs (non-MAC) {a.flops:,}")
    print(f"onnx-tool: MACs {peer_macs:,}  params {peer_params:,}")
    print(line("command line (onnxopt mac vs python -m onnx_tool)", cli_ours, cli_peer))
    print(line("library      (read + analyze vs Model + shape_infer + profile)", lib_ours, lib_peer))
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    ok = statistics.median(cli_ours) <= statistics.median(cli_peer)
    print(("PASS" if ok else "FAIL") + ": onnxopt mac <= 1x onnx-tool on the command line (medians)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
