"""The ``onnxopt`` command line."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from onnxopt.errors import OnnxoptError, OptionsError, first_line

# Tables are read in logs and CI output too: when not on a terminal, use a width that fits them instead of 80 columns.
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
out_console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("ONNXOPT_DEBUG") == "1"


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors and exit codes (2 = bad input, 3 = validation failed, 1 = internal error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        rv = cli.main(args=argv, prog_name="onnxopt", standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("onnxopt: aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except OnnxoptError as e:
        if debug:
            traceback.print_exc()
        err_console.print(f"onnxopt: error: {e}", soft_wrap=True, markup=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("onnxopt: interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, no traceback unless --debug
        if debug:
            traceback.print_exc()
        err_console.print(
            f"onnxopt: internal error: {type(e).__name__}: {first_line(e)} "
            "(run with --debug for the traceback)", soft_wrap=True, markup=False,
        )
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


class LazyGroup(click.Group):
    """A click group whose extra commands are imported only when used (keeps ``onnxopt --help`` fast)."""

    #: command name -> "module:attribute" of a click command. Add a line here to add a command.
    lazy_commands: dict[str, str] = {
        "build": "onnxopt.cli_build:build",
        "trt-check": "onnxopt.cli_build:trt_check_cmd",
        "mac": "onnxopt.cli_mac:mac",
        "quantize": "onnxopt.cli_quantize:quantize",
    }

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx, name):
        if name in self.lazy_commands:
            import importlib

            module, _, attr = self.lazy_commands[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="onnxopt")
def cli(debug: bool) -> None:
    """onnxopt: make exported ONNX models lighter without breaking them.

    Every command reads the input model and never modifies it; outputs are written atomically. Errors are one line
    with exit code 2 (bad input) or 3 (validation failed).
    """


# -- shared options ------------------------------------------------------------------------------------------------

def input_shape_option(f):
    return click.option(
        "--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS",
        help="Shape for an input with dynamic dims, e.g. input=1x3x224x224 (repeatable).",
    )(f)


def _registry():
    from onnxopt.registry import load_registry

    return load_registry()


def _build_passes(pass_specs: tuple[str, ...], config: str | None):
    from onnxopt.pipeline import DEFAULT_PIPELINE, from_specs, from_toml

    reg = _registry()
    if pass_specs and config:
        raise OptionsError("give passes with -p or with --config, not both")
    if config:
        return from_toml(config, reg)
    return from_specs(list(pass_specs or DEFAULT_PIPELINE), reg)


def _default_output(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".opt.onnx")


def _tolerances(atol: tuple[str, ...], rtol: tuple[str, ...], min_cosine: float | None):
    from onnxopt.validate import Tolerances, parse_per_output

    if not atol and not rtol and min_cosine is None:
        return None
    ga, pa = parse_per_output(atol, "--atol")
    gr, pr = parse_per_output(rtol, "--rtol")
    base = Tolerances()
    return Tolerances(
        atol=ga if ga is not None else base.atol, rtol=gr if gr is not None else base.rtol, min_cosine=min_cosine,
        per_output_atol=pa, per_output_rtol=pr,
    )


def _calibration(calib: str | None, calib_samples: int | None, allow_random: bool, model, input_shapes, seed):
    if calib is None and not allow_random:
        return None
    from onnxopt.calibration import open_calibration

    return open_calibration(calib, model=model, samples=calib_samples, random=allow_random,
                            input_shapes=input_shapes, seed=seed)


# -- run -----------------------------------------------------------------------------------------------------------

@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output model (default: MODEL.opt.onnx beside the input). Written atomically.")
@click.option("-p", "--pass", "pass_specs", multiple=True, metavar="NAME[:k=v,...]",
              help="A pass with options; repeatable, order kept. Default pipeline: fold-bn, cleanup.")
@click.option("--config", type=click.Path(path_type=Path), help="Pipeline from a TOML file ([[pass]] tables).")
@click.option("--in-place", is_flag=True, help="Allow -o to be the input file.")
@click.option("--force", is_flag=True, help="Write the output even when validation fails (and say so).")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime comparison with the original.")
@click.option("--verify-each", is_flag=True, help="Compare numerics after every pass; names the first pass that breaks them.")
@input_shape_option
@click.option("--inputs", type=click.Path(path_type=Path), help="Validation inputs: .npz with one array per input name.")
@click.option("--atol", multiple=True, metavar="[OUT=]VAL", help="Absolute tolerance, global or per output (repeatable).")
@click.option("--rtol", multiple=True, metavar="[OUT=]VAL", help="Relative tolerance, global or per output (repeatable).")
@click.option("--min-cosine", type=float, help="Fail validation when an output's cosine similarity is below this.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration data for passes that need it: .npz, folder of .npy/.npz/images, or module:function.")
@click.option("--calib-samples", type=click.IntRange(min=1), help="Use at most N calibration samples.")
@click.option("--calib-random", is_flag=True, help="Calibrate on random data (flagged in the report; for testing only).")
@click.option("--freeze-initializer-inputs", is_flag=True,
              help="Treat initializers that are also graph inputs (overridable defaults, e.g. from exports with "
                   "keep_initializers_as_inputs) as constants, so passes can fold them; they leave the inputs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random validation inputs.")
@click.option("--backend", metavar="NAME",
              help="Also build the written model for this runtime (openvino, tensorrt, onnxruntime), check its outputs "
                   "against the float model in ONNX Runtime and print the latency of both.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the run record as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and the output path.")
@click.option("--debug", is_flag=True, hidden=True)
def run(model: Path, output: Path | None, pass_specs, config, in_place, force, no_validate, verify_each, input_shapes,
        inputs, atol, rtol, min_cosine, calib, calib_samples, calib_random, freeze_initializer_inputs, seed, backend,
        json_path, quiet, debug) -> None:
    """Optimize MODEL with a pipeline of passes, validate it against the original, write it.

    \b
    Examples:
      onnxopt run model.onnx -o model.opt.onnx
      onnxopt run model.onnx -p fold-bn -p prune-channels:ratio=0.3 -p cleanup --calib data.npz
      onnxopt run model.onnx --config pipeline.toml --input-shape input=1x3x224x224
    """
    from onnxopt.model import load
    from onnxopt.pass_base import PassContext
    from onnxopt.report import print_record, write_json
    from onnxopt.shapes import parse_input_shapes
    from onnxopt.optimize import optimize
    from onnxopt.validate import load_inputs

    out = output or _default_output(model)
    if out.exists() and model.exists() and os.path.samefile(out, model) and not in_place:
        raise OptionsError(f"-o {out} is the input model; refusing to overwrite it (add --in-place to allow)")
    passes = _build_passes(pass_specs, str(config) if config else None)
    if backend:  # an unknown or missing runtime fails before the passes run
        from onnxopt.backends import get_backend

        get_backend(backend)
    shapes = parse_input_shapes(input_shapes)
    tol = _tolerances(atol, rtol, min_cosine)
    m = load(model)
    feeds = load_inputs(inputs, m) if inputs else None
    ctx = PassContext(input_shapes=shapes, seed=seed, model_dir=model.parent, progress=not quiet,
                      freeze_initializer_inputs=freeze_initializer_inputs)
    ctx.calibration = _calibration(str(calib) if calib else None, calib_samples, calib_random, m, shapes, seed)

    status = None if quiet else err_console.status("running passes…")

    def on_pass(name: str, i: int, n: int) -> None:
        if status is not None:
            status.update(f"pass {i + 1}/{n}: {name}")

    if status is not None:
        status.start()
    try:
        result = optimize(m, passes, ctx=ctx, validate=not no_validate, feeds=feeds, tolerances=tol,
                          verify_each=verify_each, on_pass=on_pass)
    finally:
        if status is not None:
            status.stop()
    record = result.record
    if ctx.calibration is not None and getattr(ctx.calibration, "is_random", False):
        record.notes.append("calibrated on RANDOM data (--calib-random): ranges do not reflect real inputs")
    if no_validate:
        record.notes.append("not validated (--no-validate)")
    if not quiet:
        print_record(record, err_console)
    if json_path:
        write_json(record.to_dict() | {"input": str(model), "output": str(out), "written": result.ok or force},
                   json_path)
    if not result.ok:
        failed = [o["name"] + ": " + o["reason"] for o in record.validation["outputs"] if not o["ok"]]
        if not force:
            from onnxopt.errors import ValidationError

            raise ValidationError("validation failed, nothing written (use --force to write anyway): " + "; ".join(failed))
        err_console.print("[bold yellow]warning:[/bold yellow] validation failed; writing anyway because of --force")
    result.save(out, protect=() if in_place else (model,))
    out_console.print(str(out)) if quiet else err_console.print(f"wrote {out}")
    if backend:
        from onnxopt.cli_build import run_backend_check
        from onnxopt.validate import random_inputs

        run_backend_check(backend, m, out, feeds if feeds is not None else random_inputs(m, shapes, seed=seed),
                          tolerances=tol, kind=record.kind, quiet=quiet)


# -- passes --------------------------------------------------------------------------------------------------------

@cli.command("passes")
@click.argument("name", required=False)
def passes_cmd(name: str | None) -> None:
    """List the available passes with their options (or one pass in detail)."""
    from onnxopt.pipeline import options_table

    reg = _registry()
    names = [name] if name else reg.names()
    for n in names:
        cls = reg.get(n)
        doc = (cls.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else ""
        out_console.print(f"[bold]{n}[/bold] ({cls.kind}) — {summary}  [dim]{reg.source(n)}[/dim]")
        if name and doc:
            out_console.print("\n".join("  " + ln for ln in doc.splitlines()[1:] if ln.strip()))
        rows = options_table(cls)
        if rows:
            t = Table(show_header=True, box=None, padding=(0, 2))
            for col in ("option", "type", "default", "help"):
                t.add_column(col)
            for row in rows:
                t.add_row(*row)
            out_console.print(t)
        out_console.print()


# -- compare -------------------------------------------------------------------------------------------------------

@cli.command()
@click.argument("model_a", type=click.Path(path_type=Path))
@click.argument("model_b", type=click.Path(path_type=Path))
@input_shape_option
@click.option("--inputs", type=click.Path(path_type=Path), help="Inputs: .npz with one array per input name.")
@click.option("--atol", multiple=True, metavar="[OUT=]VAL", help="Absolute tolerance, global or per output.")
@click.option("--rtol", multiple=True, metavar="[OUT=]VAL", help="Relative tolerance, global or per output.")
@click.option("--min-cosine", type=float, help="Fail when an output's cosine similarity is below this.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--optimized-ort", is_flag=True, help="Run ONNX Runtime with its graph optimizations on (deployment mode).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the metrics as JSON.")
@click.option("--debug", is_flag=True, hidden=True)
def compare(model_a, model_b, input_shapes, inputs, atol, rtol, min_cosine, seed, optimized_ort, json_path, debug):
    """Run MODEL_A and MODEL_B in ONNX Runtime on the same inputs and report per-output differences.

    Exit code 3 when an output is beyond the tolerances (defaults: atol 1e-4, rtol 1e-3).
    """
    from onnxopt.model import load
    from onnxopt.report import validation_table, write_json
    from onnxopt.shapes import parse_input_shapes
    from onnxopt.validate import Tolerances, compare_outputs, load_inputs, random_inputs, run, session

    a, b = load(model_a), load(model_b)
    shapes = parse_input_shapes(input_shapes)
    feeds = load_inputs(inputs, a) if inputs else random_inputs(a, shapes, seed=seed)
    tol = _tolerances(atol, rtol, min_cosine) or Tolerances()
    ra = run(session(a, optimize=optimized_ort), feeds)
    rb = run(session(b, optimize=optimized_ort), feeds)
    cmp = compare_outputs(ra, rb, tol)
    validation = {
        "mode": "ONNX Runtime CPU, optimizations " + ("on" if optimized_ort else "off"),
        "ok": cmp.ok,
        "outputs": cmp.rows(),
    }
    out_console.print(validation_table(validation))
    if json_path:
        write_json(validation, json_path)
    if not cmp.ok:
        from onnxopt.errors import ValidationError

        raise ValidationError(f"models differ: {cmp.summary()}")


if __name__ == "__main__":  # pragma: no cover
    main()
