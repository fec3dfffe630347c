"""``onnxopt mac``: MACs, FLOPs, parameters and memory of a model (definitions in :mod:`onnxopt.analysis`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click
from rich.table import Table

from onnxopt.cli import out_console
from onnxopt.errors import OnnxoptError, OptionsError


def _check_folder(path: Path | None, flag: str) -> None:
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OptionsError(f"{flag} {path}: folder {folder} does not exist")
    if path.is_dir():
        raise OptionsError(f"{flag} {path}: is a folder")


def _num(n: int | None) -> str:
    from onnxopt.report import human

    return "-" if n is None else f"{n:,} ({human(n)})" if n >= 1000 else f"{n:,}"


def _shape(shape) -> str:
    if shape is None:
        return "?"
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


@click.command("mac")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS",
              help="Input shape, e.g. input=1x3x720x1280 (repeatable): fixes dynamic dims, or replaces static ones to "
                   "show the effect of a new resolution (as set-input-shape would; nothing is written).")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many layers to list, largest MACs first (0 = every layer, in graph order).")
@click.option("--by-op", is_flag=True, help="Also show the totals per op type.")
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="Write the full report (every layer) as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path),
              help="Write a bar chart of the MACs per layer (PNG; needs matplotlib: the 'plot' extra).")
@click.option("--debug", is_flag=True, hidden=True)
def mac(model: Path, input_shapes, top: int, by_op: bool, json_path: Path | None, plot_path: Path | None,
        debug: bool) -> None:
    """Count the MACs, FLOPs, parameters, weight bytes and peak activation memory of MODEL.

    \b
    MACs: Conv/ConvTranspose/Gemm/MatMul/Einsum multiply-accumulates (bias adds are not MACs).
    FLOPs: every other op, with the unit costs documented in onnxopt.analysis.
    params: PyTorch convention (weights, biases, BatchNorm scale and shift); BN running mean/var are "buffers".
    peak memory: the largest sum of live activations when the nodes run in graph order.

    \b
    Examples:
      onnxopt mac model.onnx --top 10 --by-op
      onnxopt mac model.onnx --input-shape input=1x3x720x1280 --json mac.json --plot mac.png
    """
    from onnxopt.analysis import analyze
    from onnxopt.shapes import parse_input_shapes
    from onnxopt.skeleton import Skeleton, read_structure

    _check_folder(json_path, "--json")
    _check_folder(plot_path, "--plot")
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise OnnxoptError("--plot needs matplotlib: pip install 'onnxopt[plot]'") from None
    shapes = parse_input_shapes(input_shapes)
    # The analysis needs the graph and the dims of the weights, not their values: the file is read without the data
    # of its large tensors (memory-mapped, skipped at the wire level). The ONNX checker runs on the skeleton, and the
    # size of every skipped data field is checked against its tensor's dims, as the checker would.
    m, payloads = read_structure(model)
    skel = Skeleton(m, payloads)
    skel.check()
    whatif = _changes_static_dims(skel, shapes)
    if whatif:
        from onnxopt.resolution import plan_input_shapes

        plan = plan_input_shapes(m, shapes)
        a = analyze(m, None, skeleton=plan.skeleton)
    else:
        a = analyze(m, shapes, skeleton=skel)

    _print(a, model, top, by_op, whatif)
    if json_path is not None:
        from onnxopt.report import write_json

        write_json(a.to_dict() | {"model": str(model), "what_if_input_shapes": whatif}, json_path)
        out_console.print(f"wrote {json_path}")
    if plot_path is not None:
        plot_macs(a, plot_path, title=model.name)
        out_console.print(f"wrote {plot_path}")


def _changes_static_dims(skel, shapes: dict[str, tuple[int, ...]]) -> bool:
    from onnxopt.shapes import graph_inputs

    specs = {s.name: s for s in graph_inputs(skel.inputs_model())}
    for name, shape in shapes.items():
        spec = specs.get(name)
        if spec is None or len(spec.shape) != len(shape):
            continue  # resolve_input_shapes reports these
        if any(isinstance(have, int) and have != want for have, want in zip(spec.shape, shape)):
            return True
    return False


def _console():
    """The shared console on a terminal; a wide one otherwise (logs, pipes), so layer names are not cut."""
    if out_console.is_terminal:
        return out_console
    from rich.console import Console

    return Console(highlight=False, width=160)


def _print(a, model: Path, top: int, by_op: bool, whatif: bool) -> None:
    from onnxopt.report import human, human_bytes

    console = _console()
    total_macs = a.macs
    layers = a.layers if top == 0 else [layer for layer in a.top(top) if layer.macs or layer.flops]
    t = Table(title=f"{model.name}: " + ("every layer" if top == 0 else f"top {len(layers)} layers by MACs"),
              title_justify="left")
    for col in ("#", "layer", "op", "output", "MACs", "% MACs", "FLOPs", "params", "out bytes"):
        t.add_column(col, justify="right" if col not in ("layer", "op", "output") else "left")
    for layer in layers:
        share = f"{100 * layer.macs / total_macs:.2f}" if layer.macs and total_macs else ""
        t.add_row(
            str(layer.index), layer.name, layer.op_type, ", ".join(_shape(s) for s in layer.output_shapes),
            human(layer.macs) if layer.macs is not None else "?", share,
            human(layer.flops) if layer.flops is not None else "?", human(layer.params) if layer.params else "",
            human_bytes(layer.output_bytes),
        )
    console.print(t)

    if by_op:
        ops = Table(title="per op type", title_justify="left")
        for col in ("op", "count", "MACs", "% MACs", "FLOPs", "params", "unknown"):
            ops.add_column(col, justify="left" if col == "op" else "right")
        for op, row in a.by_op().items():
            ops.add_row(op, str(row["count"]), human(row["macs"]),
                        f"{100 * row['macs'] / total_macs:.2f}" if total_macs else "", human(row["flops"]),
                        human(row["params"]) if row["params"] else "", str(row["unknown"] or ""))
        console.print(ops)

    s = Table(title="totals", title_justify="left", show_header=False)
    s.add_column("what")
    s.add_column("value", justify="right")
    s.add_column("notes")
    inputs = ", ".join(f"{k}={_shape(v)}" for k, v in a.input_shapes.items())
    s.add_row("inputs", inputs, "what-if shapes (model unchanged)" if whatif else "")
    s.add_row("params", _num(a.params), "PyTorch convention: weights, biases, BatchNorm scale/shift")
    s.add_row("buffers", _num(a.buffers), "BatchNorm running mean/var")
    s.add_row("other constants", _num(a.constants), "shape tensors, scalars, quantization scales ...")
    s.add_row("weights", human_bytes(a.weight_bytes), f"{a.weight_bytes:,} bytes")
    unknown = a.unknown
    bound = "≥ " if unknown else ""
    s.add_row("MACs", bound + _num(a.macs), "Conv/ConvTranspose/Gemm/MatMul/Einsum multiply-accumulates")
    s.add_row("FLOPs", bound + _num(a.flops), "other ops (element-wise, pooling, norms, Resize, Softmax ...)")
    if a.peak is not None:
        s.add_row("peak activations", human_bytes(a.peak.bytes), f"{a.peak.bytes:,} bytes at node {a.peak.node} "
                  f"(step {a.peak.step}, {len(a.peak.live)} live tensors)")
    else:
        s.add_row("peak activations", "?", a.peak_note)
    console.print(s)
    if unknown:
        shown = "; ".join(f"{u.name} ({u.op_type}): {u.note}" for u in unknown[:5])
        more = f" (+{len(unknown) - 5} more in --json)" if len(unknown) > 5 else ""
        console.print(f"[yellow]warning:[/yellow] {len(unknown)} node(s) with unknown cost, totals are lower "
                          f"bounds: {shown}{more}", soft_wrap=True)


def plot_macs(a, path: Path, title: str = "") -> None:
    """Bar chart of the MACs of every layer that has MACs, in graph order (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [layer for layer in a.layers if layer.macs]
    if not layers:
        raise OnnxoptError("--plot: no layer has MACs (no Conv/Gemm/MatMul/Einsum with known shapes)")
    width = min(max(8.0, 0.18 * len(layers) + 2), 60.0)
    fig, ax = plt.subplots(figsize=(width, 5.5))
    ax.bar(range(len(layers)), [layer.macs / 1e6 for layer in layers], color="#4c72b0")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([layer.name for layer in layers], rotation=90, fontsize=6)
    ax.set_ylabel("MMACs")
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_title(f"{title}: {a.macs / 1e9:.3f} GMACs in {len(layers)} layers" if title else "MACs per layer")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
