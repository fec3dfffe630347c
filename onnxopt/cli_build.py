"""``onnxopt build`` and ``onnxopt trt-check``, and the back-end check behind ``onnxopt run --backend``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx

from onnxopt.backends import BACKENDS, get_backend
from onnxopt.backends.base import BuildOptions, LatencyStats, ShapeProfile, parse_profiles, parse_size
from onnxopt.errors import OptionsError, PreconditionError, ValidationError


def profile_option(f):
    return click.option(
        "--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS|NAME=MIN:OPT:MAX",
        help="Shape(s) of an input with dynamic dims: fixed (input=1x3x224x224) or a TensorRT optimization profile "
             "(input=1x3x224x224:8x3x224x224:32x3x224x224). Repeatable.",
    )(f)


def _console():
    from onnxopt.cli import err_console

    return err_console


def run_trt_check(model: onnx.ModelProto, profiles: dict[str, ShapeProfile], *, quiet: bool = False,
                  findings: list | None = None) -> list:
    """trt-check with its table printed; raises PreconditionError when it finds errors."""
    from onnxopt import trt_check

    if findings is None:
        findings = trt_check.check(model, profiles)
    console = _console()
    if findings and not quiet:
        console.print(trt_check.findings_table(findings))
    errors = trt_check.errors(findings)
    if errors:
        first = errors[0]
        raise PreconditionError(
            f"trt-check: {trt_check.summary(findings)}; TensorRT will not build this model as it is "
            f"(first: {first.code} at {first.node}: {first.message})")
    if not quiet:
        console.print(f"trt-check: {trt_check.summary(findings)}")
    return findings


def default_artifact(model: Path, backend: str) -> Path:
    if backend == "tensorrt":
        from onnxopt.backends.tensorrt import engine_path

        return engine_path(None, model)
    if backend == "onnxruntime":
        return model.with_name(model.stem + ".ort.onnx")
    return model.with_suffix(".xml")


# -- build ---------------------------------------------------------------------------------------------------------

@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--backend", "-b", type=click.Choice(sorted(BACKENDS)), required=True, help="Runtime to build for.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Artifact to write (default beside MODEL: .engine for tensorrt, .xml (+.bin) for openvino, "
                   ".ort.onnx for onnxruntime). Written atomically.")
@profile_option
@click.option("--workspace", metavar="SIZE", help="TensorRT: builder workspace limit, e.g. 2G or 512M.")
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="TensorRT: timing cache file, read when present and updated after the build (speeds up rebuilds).")
@click.option("--fp16", is_flag=True,
              help="Half precision where the runtime offers it as a build option (TensorRT FP16 flag while it "
                   "exists, OpenVINO f16 hint). Otherwise convert the graph: -p convert-precision:to=fp16.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU inference threads (onnxruntime, openvino).")
@click.option("--no-check", is_flag=True, help="TensorRT: do not stop on trt-check errors.")
@click.option("--debug", is_flag=True, hidden=True)
def build(model: Path, backend: str, output: Path | None, input_shapes, workspace, timing_cache, fp16, threads,
          no_check, debug) -> None:
    """Build MODEL for a deployment runtime and write the artifact (TensorRT engine, OpenVINO IR, ONNX).

    With --backend tensorrt, trt-check runs first and the build stops on its errors.

    \b
    Examples:
      onnxopt build model.onnx --backend tensorrt -o model.engine --input-shape input=1x3x224x224:8x3x224x224:32x3x224x224
      onnxopt build model.int8.onnx --backend openvino -o model.xml
    """
    from onnxopt.model import load

    if backend != "tensorrt" and (workspace or timing_cache or no_check):
        flag = "--workspace" if workspace else ("--timing-cache" if timing_cache else "--no-check")
        raise OptionsError(f"{flag} applies to --backend tensorrt only")
    if backend == "tensorrt" and threads:
        raise OptionsError("--threads applies to CPU back-ends (onnxruntime, openvino) only")
    if backend == "onnxruntime" and fp16:
        raise OptionsError("onnxruntime has no FP16 build option; convert the graph: onnxopt run MODEL "
                           "-p convert-precision:to=fp16")
    profiles = parse_profiles(input_shapes)
    size = parse_size(workspace) if workspace else None
    out = output or default_artifact(model, backend)
    if backend == "tensorrt":
        from onnxopt.backends.tensorrt import engine_path

        out = engine_path(out, model)
    if backend == "openvino" and out.suffix != ".xml":
        raise OptionsError(f"-o {out}: an OpenVINO IR path must end in .xml (weights go to .bin beside it)")
    m = load(model)
    if backend == "tensorrt":
        try:
            run_trt_check(m, profiles)
        except PreconditionError:
            if not no_check:
                raise
            _console().print("[yellow]warning:[/yellow] trt-check found errors; building anyway (--no-check)")
    be = get_backend(backend)
    options = BuildOptions(output=out, profiles=profiles, workspace=size, timing_cache=timing_cache, fp16=fp16,
                           threads=threads, protect=(model,))
    t0 = time.perf_counter()
    artifact = be.build(m, options)
    seconds = time.perf_counter() - t0
    info = ", ".join(f"{k}={v}" for k, v in artifact.info.items() if k != "output_names")
    _console().print(f"built {artifact.path} with {be.available()[1]} in {seconds:.1f} s" + (f" ({info})" if info else ""))


# -- trt-check -----------------------------------------------------------------------------------------------------

@click.command("trt-check")
@click.argument("model", type=click.Path(path_type=Path))
@profile_option
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the findings as JSON.")
@click.option("--debug", is_flag=True, hidden=True)
def trt_check_cmd(model: Path, input_shapes, json_path, debug) -> None:
    """Check MODEL against TensorRT's ONNX parser support without TensorRT: unsupported ops and attributes, INT64
    casts, Q/DQ rules (zero point 0, scale shapes, per-channel on weights only), dynamic dims without a profile.

    Exit code 2 when there are errors.
    """
    from onnxopt import trt_check
    from onnxopt.model import load
    from onnxopt.report import write_json

    profiles = parse_profiles(input_shapes)
    m = load(model)
    findings = trt_check.check(m, profiles)
    if json_path:
        write_json({"table": trt_check.TABLE_VERSION, "findings": [f.as_dict() for f in findings]}, json_path)
    run_trt_check(m, profiles, findings=findings)


# -- run --backend -------------------------------------------------------------------------------------------------

@dataclass
class BackendCheck:
    backend: str
    version: str
    validation: dict[str, Any]
    latency: dict[str, LatencyStats] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.validation["ok"])


def check_backend(
    backend: str,
    reference: onnx.ModelProto,
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    tolerances=None,
    kind: str = "exact",
    repeats: int = 20,
    warmup: int = 5,
) -> BackendCheck:
    """Build ``model`` for ``backend`` (in memory), run it on ``feeds`` and compare its outputs with the float
    ``reference`` in ONNX Runtime (optimizations off); time both (ONNX Runtime in deployment mode)."""
    from onnxopt.validate import Tolerances, compare_outputs, run, session

    be = get_backend(backend)
    profiles = {name: ShapeProfile.fixed(tuple(a.shape)) for name, a in feeds.items()}
    if backend == "tensorrt":
        run_trt_check(model, profiles, quiet=True)
    art = be.build(model, BuildOptions(profiles=profiles))
    runner = be.runner(art)
    new = runner.run(feeds)
    ref = run(session(reference), feeds)
    tol = tolerances if tolerances is not None else Tolerances.for_kind(kind)
    cmp = compare_outputs(ref, new, tol)
    validation = {
        "mode": f"{backend} vs float model in ONNX Runtime CPU",
        "ok": cmp.ok,
        "outputs": cmp.rows(),
    }
    ort = get_backend("onnxruntime")
    latency = {
        "onnxruntime (float model)": ort.runner(ort.build(reference)).latency(feeds, warmup=warmup, repeats=repeats),
        backend: runner.latency(feeds, warmup=warmup, repeats=repeats),
    }
    return BackendCheck(backend, be.available()[1], validation, latency, dict(art.info))


def latency_table(latency: dict[str, LatencyStats]):
    from rich.table import Table

    t = Table(title="latency (ms, host to host)", title_justify="left")
    for col in ("runtime", "median", "p90", "min", "runs"):
        t.add_column(col, justify="left" if col == "runtime" else "right")
    for name, s in latency.items():
        t.add_row(name, f"{s.median_ms:.3f}", f"{s.p90_ms:.3f}", f"{s.min_ms:.3f}", str(s.repeats))
    return t


def run_backend_check(backend: str, reference: onnx.ModelProto, model_path: Path, feeds, *, tolerances, kind: str,
                      quiet: bool = False) -> BackendCheck:
    """What ``onnxopt run --backend NAME`` does after writing the model: check, print, fail on a mismatch."""
    from onnxopt.model import load
    from onnxopt.report import validation_table

    result = check_backend(backend, reference, load(model_path), feeds, tolerances=tolerances, kind=kind)
    if not quiet:
        console = _console()
        console.print(validation_table(result.validation))
        console.print(latency_table(result.latency))
    if not result.ok:
        bad = "; ".join(f"{o['name']}: {o['reason']}" for o in result.validation["outputs"] if not o["ok"])
        raise ValidationError(f"{backend} outputs differ from the float model: {bad}")
    return result
