"""``onnxopt quantize``: fold BatchNorm, quantize to INT8, and (with ``--eval``) print float vs int8 accuracy in both
ONNX Runtime modes (reference semantics and deployment kernels)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from onnxopt.cli import _calibration, err_console, input_shape_option, out_console
from onnxopt.errors import OptionsError


def _eval_data(path: Path, model):
    """(feeds, labels) from an npz: ``test_<input>`` (or ``test_input``) + ``test_labels``, else ``<input>`` + ``labels``."""
    import numpy as np

    from onnxopt.shapes import graph_inputs

    if not path.is_file():
        raise OptionsError(f"--eval {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises several types
        raise OptionsError(f"--eval {path}: not a readable .npz ({e})") from e
    inputs = graph_inputs(model)
    keys = list(data.files)
    single = len(inputs) == 1
    if "test_labels" in keys:
        labels_key, candidates = "test_labels", lambda n: [f"test_{n}"] + (["test_input"] if single else [])
    elif "labels" in keys:
        labels_key, candidates = "labels", lambda n: [n] + (["input"] if single else [])
    else:
        raise OptionsError(f"--eval {path}: expected test_labels (with test_<input>) or labels (with <input>); "
                           f"has {', '.join(keys)}")
    feeds = {}
    for spec in inputs:
        key = next((k for k in candidates(spec.name) if k in keys), None)
        if key is None:
            raise OptionsError(f"--eval {path}: no array for input {spec.name!r} (looked for "
                               f"{', '.join(candidates(spec.name))}); has {', '.join(keys)}")
        feeds[spec.name] = data[key]
    labels = data[labels_key]
    specs = {s.name: s for s in inputs}
    feeds = {k: v.astype(specs[k].dtype, copy=False) for k, v in feeds.items()}
    return feeds, labels


@click.command("quantize")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output (default: MODEL.int8.onnx).")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration data: .npz, folder of .npy/.npz/images, or module:function.")
@click.option("--calib-samples", type=click.IntRange(min=1), help="Use at most N calibration samples.")
@click.option("--calib-random", is_flag=True, help="Calibrate on random data (flagged; for testing only).")
@click.option("--calib-cache", type=click.Path(path_type=Path), help="Calibration statistics cache (JSON).")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="entropy",
              show_default=True)
@click.option("--percentile", type=float, default=99.99, show_default=True)
@click.option("--target", type=click.Choice(["tensorrt", "onnxruntime"]), default="tensorrt", show_default=True)
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Node name pattern or op type kept in float.")
@click.option("--skip-first-last", is_flag=True, help="Keep the first and last compute layers in float.")
@click.option("--sensitivity", is_flag=True, help="Keep the most sensitive layers in float until the target holds.")
@click.option("--target-cosine", type=float, default=0.999, show_default=True)
@click.option("--target-accuracy-drop", type=float, help="Maximum accuracy drop in points (needs labels).")
@click.option("--plot-dir", type=click.Path(path_type=Path), help="Write range histograms (needs matplotlib).")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path),
              help="npz with test_<input>/test_labels (or <input>/labels): print float vs int8 accuracy, ORT "
                   "reference and deployment modes.")
@input_shape_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the run record as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and the output path.")
@click.option("--debug", is_flag=True, hidden=True)
def quantize(model, output, calib, calib_samples, calib_random, calib_cache, method, percentile, target, exclude,
             skip_first_last, sensitivity, target_cosine, target_accuracy_drop, plot_dir, eval_path, input_shapes,
             seed, json_path, quiet, debug):
    """Quantize MODEL to INT8 (fold-bn, then quantize) and write it.

    \b
    Examples:
      onnxopt quantize models/digits_resnet.onnx --calib models/digits.npz --eval models/digits.npz
      onnxopt quantize model.onnx --calib imgs/?mean=0.485,0.456,0.406&std=0.229,0.224,0.225 --target onnxruntime
    """
    from rich.table import Table

    from onnxopt.model import load, save
    from onnxopt.optimize import optimize
    from onnxopt.pass_base import PassContext
    from onnxopt.quantization import accuracy, run_batched
    from onnxopt.registry import load_registry
    from onnxopt.report import print_record, write_json
    from onnxopt.shapes import parse_input_shapes
    from onnxopt.validate import session

    out = output or model.with_name(model.stem + ".int8.onnx")
    if out.exists() and model.exists() and os.path.samefile(out, model):
        raise OptionsError(f"-o {out} is the input model; refusing to overwrite it")
    reg = load_registry()
    opts = dict(method=method, percentile=percentile, target=target, exclude=tuple(exclude),
                skip_first_last=skip_first_last, sensitivity=sensitivity, target_cosine=target_cosine,
                target_accuracy_drop=target_accuracy_drop, calib_cache=str(calib_cache) if calib_cache else None,
                plot_dir=str(plot_dir) if plot_dir else None)
    passes = [reg.create("fold-bn"), reg.create("quantize", **opts)]
    shapes = parse_input_shapes(input_shapes)
    m = load(model)
    evaluation = _eval_data(eval_path, m) if eval_path else None
    ctx = PassContext(input_shapes=shapes, seed=seed, model_dir=model.parent, progress=not quiet)
    ctx.calibration = _calibration(str(calib) if calib else None, calib_samples, calib_random, m, shapes, seed)
    result = optimize(m, passes, ctx=ctx)
    record = result.record
    if ctx.calibration is not None and getattr(ctx.calibration, "is_random", False):
        record.notes.append("calibrated on RANDOM data (--calib-random): ranges do not reflect real inputs")
    if not quiet:
        print_record(record, err_console)
    rows = {}
    if evaluation is not None:
        feeds, labels = evaluation
        batch = next((d for d in (s.type.tensor_type.shape.dim[0].dim_value for s in m.graph.input) if d), 64)
        for label, mdl, opt in (("float, ORT optimizations off", m, False), ("float, ORT_ENABLE_ALL", m, True),
                                ("int8, ORT optimizations off (reference)", result.model, False),
                                ("int8, ORT_ENABLE_ALL (deployment)", result.model, True)):
            acc = accuracy(run_batched(session(mdl, optimize=opt), feeds, batch), labels)
            if acc is None:
                raise OptionsError(f"--eval {eval_path}: the model's first output is not a classifier output [N, C]")
            rows[label] = acc
        table = Table(title=f"top-1 accuracy on {len(labels)} samples of {eval_path}", title_justify="left")
        table.add_column("model")
        table.add_column("accuracy", justify="right")
        table.add_column("vs float", justify="right")
        base = rows["float, ORT optimizations off"]
        for k, v in rows.items():
            table.add_row(k, f"{100 * v:.2f}%", f"{100 * (v - base):+.2f}")
        out_console.print(table)
    if json_path:
        write_json(record.to_dict() | {"input": str(model), "output": str(out), "eval_accuracy": rows}, json_path)
    save(result.model, out, protect=(model,))
    out_console.print(str(out)) if quiet else err_console.print(f"wrote {out}")
