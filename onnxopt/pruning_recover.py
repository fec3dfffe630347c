"""Post-pruning recovery by least squares (channel pruning by reconstruction, He et al. 2017, without the Lasso step).

After channels are removed, every layer that lost *input* channels (Conv, grouped Conv, Gemm, MatMul) is re-fitted so
that, on calibration data, its output from the pruned model's activations matches the unpruned model's output:

    min_W,b  || Y_orig - [X_pruned, 1] [W; b] ||^2 + lambda || [W; b] - [W0; b0] ||^2

Layers are processed in waves (a wave holds layers none of which depends on another): the inputs X of a wave are read
from the pruned model *after* the earlier waves were re-fitted, so later layers also correct the error left by earlier
ones. Memory is bounded: per layer only the normal equations X^T X and X^T Y are accumulated (float64), batch by batch;
activations are read from ONNX Runtime by adding the needed tensors as outputs of a copy of the model.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graphutil import const_value, fresh_name, unique_name
from onnxopt.progress import ProgressBar
from onnxopt.pruning import ChannelGraph, Layer, _attr


#: Samples per ONNX Runtime call when reading activations (the source's static batch dim wins).
BATCH = 32
#: Output positions per calibration sample used in a conv layer's least-squares problem.
ROWS_PER_SAMPLE = 64


def calibration_batches(source: Any, limit: int) -> Iterator[dict[str, np.ndarray]]:
    """Feed dicts from a calibration source (any re-iterable of feed dicts), at most ``limit`` samples in total.

    A batch that would exceed the limit is dropped (not cut: a model with a static batch dim needs whole batches),
    except the first one, which is cut to ``limit`` samples.
    """
    seen = 0
    # a calibration source (onnxopt.calibration) re-batches on request: whole batches keep ONNX Runtime busy
    stream = source.batches(BATCH) if hasattr(source, "batches") else iter(source)
    for feeds in stream:
        n = len(next(iter(feeds.values())))
        if seen + n > limit:
            if seen == 0:
                yield {k: v[:limit] for k, v in feeds.items()}
            return
        seen += n
        yield feeds


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate tensors ``names`` (float, shape left to ORT)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
            have.add(n)
    return m


def _conv_geometry(node: gs.Node, w: np.ndarray, in_hw: tuple[int, int]) -> tuple | None:
    if w.ndim != 4:
        return None
    kh, kw = w.shape[2:]
    strides = list(_attr(node, "strides", [1, 1]))
    dil = list(_attr(node, "dilations", [1, 1]))
    auto = _attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i, (size, k, s, d) in enumerate(zip(in_hw, (kh, kw), strides, dil)):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + 2] = lo, total - lo
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    return (kh, kw), strides, dil, pads


def patches(x: np.ndarray, kernel, strides, dil, pads, n_idx, oh_idx, ow_idx) -> np.ndarray:
    """The input patches of output positions ``(n, oh, ow)``: rows ``[k, C*KH*KW]`` in the order of
    ``W.reshape(O, -1)``."""
    kh, kw = kernel
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    eh, ew = (kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))
    win = win[:, :, :: strides[0], :: strides[1], :: dil[0], :: dil[1]]  # [N, C, OH, OW, KH, KW]
    rows = win[n_idx, :, oh_idx, ow_idx]  # [k, C, KH, KW]
    return rows.reshape(len(n_idx), -1)


class _Normal:
    """Accumulated normal equations of one least-squares problem."""

    def __init__(self, dim: int, outs: int) -> None:
        self.xtx = np.zeros((dim, dim))
        self.xty = np.zeros((dim, outs))
        self.rows = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        # products in float32 per batch (fast BLAS), accumulated over batches in float64
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.xtx += x.T @ x
        self.xty += x.T @ np.ascontiguousarray(y, dtype=np.float32)
        self.rows += len(x)

    def solve(self, theta0: np.ndarray, ridge: float) -> np.ndarray:
        dim = len(self.xtx)
        lam = ridge * float(np.trace(self.xtx)) / max(dim, 1)
        a = self.xtx + lam * np.eye(dim)
        b = self.xty + lam * theta0
        try:
            return np.linalg.solve(a, b)
        except np.linalg.LinAlgError:
            return np.linalg.lstsq(a, b, rcond=None)[0]


class _Refit:
    """One layer being re-fitted: its kept channel indices and per-group normal equations."""

    def __init__(self, ly: Layer, in_keep: np.ndarray, out_keep: np.ndarray, node: gs.Node) -> None:
        self.ly = ly
        self.node = node
        self.in_keep = in_keep  # over the ORIGINAL input channels
        self.out_keep = out_keep  # over the ORIGINAL output channels
        self.w = np.asarray(const_value(node.inputs[1]))  # current (pruned) weight
        bi = ly.bias_index
        self.b = None if bi is None else np.asarray(const_value(node.inputs[bi]))
        self.fit_bias = ly.kind != "matmul" and (self.b is None or (self.b.ndim == 1 and self.b.size == out_keep.sum()))
        self.groups = ly.groups if ly.kind == "conv" else 1
        self.normals: list[_Normal] = []
        self.geometry = None

    def _theta0(self, gi: int) -> np.ndarray:
        ly, w = self.ly, self.w
        if ly.kind == "conv":
            og = w.shape[0] // self.groups
            wg = w[gi * og:(gi + 1) * og].reshape(og, -1).T  # [C*K, O]
        elif ly.kind == "gemm":
            wg = w.T if ly.w_in_axis == 1 else w  # [K, O]
        else:
            wg = w
        if self.fit_bias:
            b = np.zeros(wg.shape[1]) if self.b is None else self.b.reshape(-1)[
                gi * wg.shape[1]:(gi + 1) * wg.shape[1]]
            wg = np.vstack([wg, b[None, :]])
        return wg.astype(np.float64)

    def accumulate(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> None:
        ly = self.ly
        y = np.compress(self.out_keep, y, axis=1 if ly.kind != "matmul" else y.ndim - 1)
        if ly.kind == "conv":
            if self.geometry is None:
                self.geometry = _conv_geometry(self.node, self.w, x.shape[2:])
            kernel, strides, dil, pads = self.geometry
            n, _, oh, ow = y.shape
            # at most ROWS_PER_SAMPLE output positions per sample (uniform, seeded): the normal equations of a few
            # thousand positions per layer pin the weights down; all positions would cost far more for little gain
            total = n * oh * ow
            take = min(total, ROWS_PER_SAMPLE * n)
            flat = np.sort(rng.choice(total, take, replace=False)) if take < total else np.arange(total)
            n_idx, rest = np.divmod(flat, oh * ow)
            oh_idx, ow_idx = np.divmod(rest, ow)
            yr = y[n_idx, :, oh_idx, ow_idx]  # [k, O]
            g = self.groups
            cg = x.shape[1] // g
            og = y.shape[1] // g
            for gi in range(g):
                cols = patches(x[:, gi * cg:(gi + 1) * cg], kernel, strides, dil, pads, n_idx, oh_idx, ow_idx)
                if self.fit_bias:
                    cols = np.hstack([cols, np.ones((len(cols), 1), dtype=cols.dtype)])
                if len(self.normals) <= gi:
                    self.normals.append(_Normal(cols.shape[1], og))
                self.normals[gi].add(cols, yr[:, gi * og:(gi + 1) * og])
            return
        xr = x.reshape(-1, x.shape[-1])
        yr = y.reshape(-1, y.shape[-1])
        if self.fit_bias:
            xr = np.hstack([xr, np.ones((len(xr), 1), dtype=xr.dtype)])
        if not self.normals:
            self.normals.append(_Normal(xr.shape[1], yr.shape[1]))
        self.normals[0].add(xr, yr)

    def solve(self, ridge: float) -> tuple[np.ndarray, np.ndarray | None]:
        ly, w = self.ly, self.w
        thetas = [n.solve(self._theta0(gi), ridge) for gi, n in enumerate(self.normals)]
        bias = None
        if self.fit_bias:
            bias = np.concatenate([t[-1] for t in thetas]).astype(w.dtype)
            thetas = [t[:-1] for t in thetas]
        if ly.kind == "conv":
            og = w.shape[0] // self.groups
            new_w = np.concatenate([t.T.reshape((og,) + w.shape[1:]) for t in thetas]).astype(w.dtype)
        elif ly.kind == "gemm":
            new_w = (thetas[0].T if ly.w_in_axis == 1 else thetas[0]).astype(w.dtype)
        else:
            new_w = thetas[0].astype(w.dtype)
        return new_w, bias


def _waves(graph: gs.Graph, layers: list[Layer]) -> list[list[Layer]]:
    """Group layers so that no layer depends on another of its wave (longest chain of refit layers above it)."""
    by_node = {id(ly.node): ly for ly in layers}
    depth_of: dict[str, int] = {}
    level: dict[int, int] = {}
    for n in graph.nodes:
        d = max((depth_of.get(t.name, 0) for t in n.inputs if t is not None), default=0)
        if id(n) in by_node:
            d += 1
            level[id(n)] = d
        for t in n.outputs:
            depth_of[t.name] = d
    waves: dict[int, list[Layer]] = defaultdict(list)
    for ly in layers:
        waves[level[id(ly.node)]].append(ly)
    return [waves[k] for k in sorted(waves)]


def lstsq_refit(
    graph: gs.Graph,
    original: onnx.ModelProto,
    cg: ChannelGraph,
    keep_class: np.ndarray,
    ctx: Any,
    *,
    samples: int,
    ridge: float,
) -> Counter:
    """Re-fit the layers of the (already pruned) ``graph`` that lost input channels; returns counters for stats."""
    from onnxopt.validate import session

    notes: Counter = Counter()
    todo: list[Layer] = []
    for ly in cg.layers:
        if ly.in_name is None or ly.depthwise:
            continue
        in_keep = keep_class[cg.class_of[cg.layouts[ly.in_name].elems]]
        if in_keep.all():
            continue
        if ly.kind == "convtranspose" or (ly.kind == "conv" and ly.weight.ndim != 4):
            notes["recover_skipped_unsupported_layer"] += 1
            continue
        if ly.kind == "gemm" and int(_attr(ly.node, "transA", 0)):
            notes["recover_skipped_unsupported_layer"] += 1
            continue
        todo.append(ly)
    if not todo:
        return notes
    orig_sess = session(with_outputs(original, [ly.out_name for ly in todo]), optimize=True)
    taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    rng = np.random.default_rng(getattr(ctx, "seed", 0))
    waves = _waves(graph, todo)
    with ProgressBar(getattr(ctx, "progress", False), len(waves), "least-squares recovery") as bar:
        for wave in waves:
            bar.advance(0, ", ".join(ly.node.name for ly in wave)[:60])
            if not _refit_wave(graph, wave, cg, keep_class, ctx, orig_sess, taken, rng, samples, ridge, notes):
                return notes
            bar.advance(1)
    return notes


def _refit_wave(graph: gs.Graph, wave: list[Layer], cg: ChannelGraph, keep_class: np.ndarray, ctx: Any,
                orig_sess: Any, taken: set[str], rng: np.random.Generator, samples: int, ridge: float,
                notes: Counter) -> bool:
    """Re-fit one wave of layers (no layer's input depends on another's refit); False when there was no data."""
    from onnxopt.validate import session

    refits: list[_Refit] = []
    for ly in wave:
        in_keep = keep_class[cg.class_of[cg.layouts[ly.in_name].elems]]
        out_keep = (keep_class[cg.class_of[cg.layouts[ly.out_name].elems]]
                    if ly.out_name in cg.layouts else np.ones(ly.out_channels, dtype=bool))
        refits.append(_Refit(ly, in_keep, out_keep, ly.node))
    pruned = ctx.to_model(graph)
    pr_sess = session(with_outputs(pruned, [ly.in_name for ly in wave]), optimize=True)
    xs_names = [ly.in_name for ly in wave]
    ys_names = [ly.out_name for ly in wave]
    n_samples = 0
    for feeds in calibration_batches(ctx.calibration, samples):
        ys = orig_sess.run(ys_names, feeds)
        xs = pr_sess.run(xs_names, feeds)
        for r, x, y in zip(refits, xs, ys):
            r.accumulate(x, y, rng)
        n_samples += len(next(iter(feeds.values())))
    if n_samples == 0:
        notes["recover_no_calibration_data"] += 1
        return False
    notes["recover_samples"] = n_samples
    for r in refits:
        new_w, bias = r.solve(ridge)
        node = r.node
        node.inputs[1] = gs.Constant(_name(node.inputs[1], taken), new_w)
        if bias is not None:
            bi = r.ly.bias_index
            if bi is not None:
                node.inputs[bi] = gs.Constant(_name(node.inputs[bi], taken), bias.reshape(r.b.shape))
            else:
                node.inputs.append(gs.Constant(unique_name(graph, f"{node.name}_bias", taken), bias))
                r.ly.bias_index = len(node.inputs) - 1
        notes["recover_refit_layers"] += 1
    return True


def _name(old: gs.Tensor, taken: set[str]) -> str:
    if isinstance(old, gs.Constant) and len(old.outputs) == 1:
        return old.name
    return fresh_name(f"{old.name or 'refit'}_refit", taken)
