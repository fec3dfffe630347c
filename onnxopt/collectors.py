"""Streaming range collectors and the calibration runner that feeds them from ONNX Runtime.

A :class:`RangeCollector` keeps, for one tensor, the exact min and max and a histogram of ``|x|`` with a fixed number
of bins over ``[0, R]``. When a batch holds a value beyond ``R``, ``R`` is doubled (as often as needed) and adjacent
bins are merged in pairs, which is exact: the histogram is the one that would have been built with the final ``R`` from
the start (up to values lying exactly on a bin edge). Memory per tensor is constant, whatever the number of samples.

Range methods, all computed from that state:

``minmax``      the observed range (``max |x|`` for symmetric quantization).
``percentile``  the ``p``-th percentile of ``|x|`` (default 99.99), interpolated inside its bin.
``entropy``     TensorRT's KL-divergence calibration (first bin levelled, see :func:`threshold_entropy`; never below
                the 99.9th percentile by default, see :meth:`RangeCollector.threshold`): for every
                candidate number ``i`` of kept bins, the reference
                distribution P is the histogram cut at ``i`` with the clipped mass added to its last bin, the candidate
                Q is the same bins merged into ``levels + 1`` quantization bins and expanded back over P's non-empty
                bins; the threshold is the edge of the ``i`` minimizing KL(P || Q). Computed from cumulative sums,
                one vector operation per merge factor rather than a loop over ``i``.
``mse``         the clip ``T`` minimizing the expected squared quantization error of the observed histogram: values
                beyond ``T`` cost ``(|x| - T)^2``, values below half a step round to zero and cost ``x^2``, the others
                cost the uniform rounding noise ``step^2 / 12`` with ``step = T / levels``.

:func:`collect` reads intermediate tensors from ONNX Runtime by adding them as outputs of a copy of the model. Each
tensor's min and max are reduced inside the graph (``ReduceMin``/``ReduceMax``, exact over every element) and, unless
``subsample=0``, only an evenly strided subset of about ``subsample`` values per sample (with an offset that moves from
batch to batch) leaves the runtime to be histogrammed; histogramming every value of every activation costs more than the
forward pass itself. When the tensors' outputs together would exceed ``memory_mb`` per batch, they are read in several
passes over the data, in groups that fit.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxopt.errors import OnnxoptError, OptionsError
from onnxopt.graphutil import fresh_name
from onnxopt.progress import ProgressBar

#: Histogram bins over ``[0, R]``; a power of two so that growing ``R`` merges whole bins.
NUM_BINS = 4096
#: Default number of values per sample and tensor that are histogrammed (min/max always use every value).
DEFAULT_SUBSAMPLE = 4096
#: Default memory budget for the tensors read from the runtime per batch.
DEFAULT_MEMORY_MB = 256
#: ``entropy`` never clips below this percentile of ``|x|`` (see :meth:`RangeCollector.threshold`).
DEFAULT_ENTROPY_GUARD = 99.9

METHODS = ("minmax", "percentile", "entropy", "mse")


# -- thresholds from a histogram of |x| ------------------------------------------------------------------------------

def threshold_percentile(hist: np.ndarray, width: float, percentile: float) -> float:
    """The ``percentile``-th percentile of the values histogrammed in ``hist`` (bins of ``width`` from 0)."""
    if not 0 < percentile <= 100:
        raise OptionsError(f"percentile must be in (0, 100], got {percentile}")
    h = np.asarray(hist, dtype=np.float64)
    total = h.sum()
    if total <= 0:
        return 0.0
    cdf = np.cumsum(h)
    target = total * percentile / 100.0
    b = int(np.searchsorted(cdf, target, side="left"))
    b = min(b, len(h) - 1)
    below = cdf[b - 1] if b > 0 else 0.0
    frac = (target - below) / h[b] if h[b] > 0 else 1.0
    return float((b + min(max(frac, 0.0), 1.0)) * width)


def kl_divergences(hist: np.ndarray, num_quantized_bins: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) of TensorRT's entropy calibration for every candidate cut ``i`` in ``[num_quantized_bins, n]``.

    Returns ``(candidates, divergences)``. ``hist`` counts ``|x|`` in equal bins starting at 0; trailing empty bins
    are ignored. A candidate whose last quantization bin would have to carry clipped mass while holding no values of
    its own gets an infinite divergence.
    """
    h = np.asarray(hist, dtype=np.float64)
    nz = np.nonzero(h)[0]
    nq = int(num_quantized_bins)
    if nz.size == 0:
        return np.array([], dtype=np.int64), np.array([])
    n = int(nz[-1]) + 1
    h = h[:n]
    if n <= nq:
        return np.array([n], dtype=np.int64), np.array([0.0])
    total = h.sum()
    cs = np.concatenate([[0.0], np.cumsum(h)])                     # cs[k] = sum h[:k]
    cz = np.concatenate([[0], np.cumsum(h > 0)])                    # non-empty bins in h[:k]
    with np.errstate(divide="ignore", invalid="ignore"):
        hl = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    cl = np.concatenate([[0.0], np.cumsum(hl)])                     # sum h log h over h[:k]
    # Candidates with the same merge factor m = i // nq share their first nq - 1 quantization bins; only the last one
    # (which holds bin i - 1 and the clipped mass) depends on i. So: the nq - 1 chunk terms of every m as one
    # (m, nq - 1) array, then every candidate i in [nq, n] as one vector.
    ms = np.arange(1, n // nq + 1, dtype=np.int64)
    starts = np.arange(nq, dtype=np.int64)[None, :] * ms[:, None]
    tj = cs[starts[:, 1:]] - cs[starts[:, :-1]]                # Q (= P) mass of the first nq - 1 bins, per m
    nj = cz[starts[:, 1:]] - cz[starts[:, :-1]]                # their non-empty bins
    with np.errstate(divide="ignore", invalid="ignore"):
        fixed = np.sum(np.where(tj > 0, tj * np.log(np.where(tj > 0, tj, 1.0) / np.maximum(nj, 1)), 0.0), axis=1)
    cand = np.arange(nq, n + 1, dtype=np.int64)                # i = number of kept bins
    m = cand // nq
    first_last = (nq - 1) * m
    out = total - cs[cand]                                     # clipped mass added to P[i-1]
    last = h[cand - 1]
    t_last = cs[cand] - cs[first_last]
    n_last = (cz[cand] - cz[first_last]) + ((last == 0) & (out > 0))
    p_last = t_last + out
    p_edge = last + out                                        # P[i-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = cl[cand - 1] + np.where(p_edge > 0, p_edge * np.log(np.where(p_edge > 0, p_edge, 1.0)), 0.0)
        qlog = np.where(p_last > 0, p_last * np.log(np.where(t_last > 0, t_last, 1.0) / np.maximum(n_last, 1)), 0.0)
        kl = (plogp - fixed[m - 1] - qlog) / total - math.log(total) + np.log(cs[cand])
    kl = np.where((p_last > 0) & (t_last <= 0), np.inf, np.maximum(kl, 0.0))
    return cand, kl


def threshold_entropy(hist: np.ndarray, width: float, num_quantized_bins: int = 128) -> float:
    """The clip threshold of TensorRT's entropy (KL-divergence) calibration: the edge of the best cut.

    The first bin's count is replaced by the second's before the search (as NVIDIA's pytorch-quantization does): it
    holds the exact zeros of ReLU outputs, a spike that otherwise dominates the divergence and collapses the clip.
    """
    h = np.array(hist, dtype=np.float64)
    if len(h) > 1:
        h[0] = h[1]
    cand, kl = kl_divergences(h, num_quantized_bins)
    if cand.size == 0:
        return 0.0
    return float(cand[int(np.argmin(kl))] * width)


def expected_mse(hist: np.ndarray, width: float, levels: int, thresholds: np.ndarray) -> np.ndarray:
    """Expected squared error (summed over the histogrammed values) of clipping at each of ``thresholds``.

    Bin contents are represented by the bin centres. See the module doc for the error model.
    """
    h = np.asarray(hist, dtype=np.float64)
    x = (np.arange(len(h)) + 0.5) * width
    t = np.asarray(thresholds, dtype=np.float64)
    c0 = np.concatenate([[0.0], np.cumsum(h)])
    c1 = np.concatenate([[0.0], np.cumsum(h * x)])
    c2 = np.concatenate([[0.0], np.cumsum(h * x * x)])
    n = len(h)
    # bins whose centre is above t: index >= ceil(t / width - 0.5)
    above = np.clip(np.ceil(t / width - 0.5).astype(np.int64), 0, n)
    clip_err = (c2[n] - c2[above]) - 2 * t * (c1[n] - c1[above]) + t * t * (c0[n] - c0[above])
    step = t / levels
    zero = np.minimum(np.clip(np.ceil(step / (2 * width) - 0.5).astype(np.int64), 0, n), above)
    round_err = c2[zero] + (c0[above] - c0[zero]) * step * step / 12.0
    return clip_err + round_err


def threshold_mse(hist: np.ndarray, width: float, levels: int = 127) -> float:
    """The clip that minimizes :func:`expected_mse` over every bin edge."""
    h = np.asarray(hist, dtype=np.float64)
    nz = np.nonzero(h)[0]
    if nz.size == 0:
        return 0.0
    n = int(nz[-1]) + 1
    t = np.arange(1, n + 1, dtype=np.float64) * width
    err = expected_mse(h[:n], width, levels, t)
    return float(t[int(np.argmin(err))])


# -- the streaming collector -----------------------------------------------------------------------------------------

class RangeCollector:
    """Streaming statistics of one tensor: exact min/max and a fixed-size histogram of ``|x|`` (see the module doc)."""

    def __init__(self, bins: int = NUM_BINS) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError("bins must be a power of two >= 2")
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.int64)
        self.edge = 0.0          # R: the histogram covers [0, R]
        self.min = math.inf
        self.max = -math.inf
        self.count = 0           # values histogrammed
        self.nonfinite = 0       # NaN/Inf values seen (ignored)
        self._memo: dict[tuple, float] = {}  # thresholds computed since the last update

    @property
    def width(self) -> float:
        return self.edge / self.bins if self.edge > 0 else 0.0

    @property
    def absmax(self) -> float:
        if self.count == 0 and not math.isfinite(self.max):
            return 0.0
        return max(abs(self.min), abs(self.max))

    def _grow(self, amax: float) -> None:
        if amax <= self.edge:
            return
        if self.edge == 0.0:
            self.edge = float(amax)  # everything so far was zero: it stays in bin 0
            return
        factor = 1 << max(0, math.ceil(math.log2(amax / self.edge)))
        while self.edge * factor < amax:
            factor <<= 1
        if factor >= self.bins:
            merged = np.zeros(self.bins, dtype=np.int64)
            merged[0] = self.hist.sum()
        else:
            merged = np.zeros(self.bins, dtype=np.int64)
            merged[: self.bins // factor] = self.hist.reshape(-1, factor).sum(axis=1)
        self.hist = merged
        self.edge *= factor

    def update(self, values: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Add ``values`` to the histogram; ``lo``/``hi`` are the exact min/max of the batch they were drawn from
        (default: of ``values``)."""
        self._memo.clear()
        v = np.asarray(values)
        if v.dtype != np.float32 and v.dtype != np.float64:
            v = v.astype(np.float32)
        v = v.ravel()
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            finite = np.isfinite(v)
            if not finite.all():
                self.nonfinite += int(v.size - np.count_nonzero(finite))
                v = v[finite]
            if v.size == 0:
                return
            lo, hi = float(v.min()), float(v.max())
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))
        if v.size == 0:
            return
        self._grow(max(abs(float(lo)), abs(float(hi))))
        if self.edge == 0.0:
            self.hist[0] += v.size
        else:
            idx = np.abs(v)
            idx *= self.bins / self.edge
            idx = idx.astype(np.intp)
            np.minimum(idx, self.bins - 1, out=idx)
            self.hist += np.bincount(idx, minlength=self.bins)
        self.count += int(v.size)

    # -- ranges --------------------------------------------------------------------------------------------------
    def threshold(self, method: str, *, percentile: float = 99.99, levels: int = 127,
                  entropy_guard: float = DEFAULT_ENTROPY_GUARD) -> float:
        """The clip ``T`` of ``|x|`` chosen by ``method`` (never above the observed ``max |x|``).

        ``entropy_guard``: ``entropy`` never clips below this percentile of ``|x|`` (0: TensorRT's plain result). On
        histograms with spikes (constant image regions give many equal values), the KL landscape is dominated by where
        the spikes fall relative to the merge boundaries, and its minimum can clip the informative tail: on the shipped
        digits ResNet the plain search clips 0.48% of the stem activations (T = 2.2 of max 6.5) and costs 0.5 points
        of accuracy, while on that model's other tensors it clips at most 0.03%.
        """
        if method not in METHODS:
            raise OptionsError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
        amax = self.absmax
        if method == "minmax" or self.count == 0 or self.edge == 0.0:
            t = amax
        elif method == "percentile":
            t = threshold_percentile(self.hist, self.width, percentile)
        elif method == "entropy":
            key = ("entropy", levels)
            if key not in self._memo:
                self._memo[key] = threshold_entropy(self.hist, self.width, levels + 1)
            t = self._memo[key]
            if entropy_guard > 0:
                t = max(t, threshold_percentile(self.hist, self.width, entropy_guard))
        else:
            t = threshold_mse(self.hist, self.width, levels)
        return float(min(t, amax)) if amax > 0 else 0.0

    def range(self, method: str, *, percentile: float = 99.99, symmetric: bool = True,
              entropy_guard: float = DEFAULT_ENTROPY_GUARD) -> tuple[float, float]:
        """The quantization range ``(lo, hi)``, which always contains 0.

        Symmetric: ``(-T, T)`` with ``T`` chosen for 127 levels. Asymmetric (8-bit unsigned): a tensor that is never
        negative gets ``(0, T)`` with ``T`` chosen for 255 levels; otherwise ``minmax`` gives the observed range and the
        other methods clip each side at ``T`` (127 levels).
        """
        kw = dict(percentile=percentile, entropy_guard=entropy_guard)
        if symmetric:
            t = self.threshold(method, levels=127, **kw)
            return -t, t
        lo, hi = (min(self.min, 0.0), max(self.max, 0.0)) if self.count or math.isfinite(self.min) else (0.0, 0.0)
        if lo >= 0:
            return 0.0, self.threshold(method, levels=255, **kw)
        if method == "minmax":
            return lo, hi
        t = self.threshold(method, levels=127, **kw)
        return max(lo, -t), min(hi, t)

    # -- cache state ---------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        nz = np.nonzero(self.hist)[0]
        return {
            "min": self.min if math.isfinite(self.min) else None,
            "max": self.max if math.isfinite(self.max) else None,
            "edge": self.edge, "bins": self.bins, "count": self.count, "nonfinite": self.nonfinite,
            "hist_index": nz.tolist(), "hist_count": self.hist[nz].tolist(),
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "RangeCollector":
        c = cls(int(d["bins"]))
        c.min = math.inf if d["min"] is None else float(d["min"])
        c.max = -math.inf if d["max"] is None else float(d["max"])
        c.edge = float(d["edge"])
        c.count = int(d["count"])
        c.nonfinite = int(d.get("nonfinite", 0))
        idx = np.asarray(d["hist_index"], dtype=np.int64)
        cnt = np.asarray(d["hist_count"], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= c.bins) or idx.shape != cnt.shape:
            raise ValueError("bad histogram state")
        c.hist[idx] = cnt
        c._memo.clear()
        return c


# -- reading tensors from ONNX Runtime -------------------------------------------------------------------------------

@dataclass(frozen=True)
class CollectPlan:
    """How the tensors are read: groups (one pass over the data each) and whether values are subsampled."""

    groups: list[list[str]]
    subsample: int


_FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE}


def tensor_info(model: onnx.ModelProto) -> dict[str, tuple[int, tuple]]:
    """elem type and shape of every value known after shape inference."""
    from onnxopt.shapes import infer_shapes

    try:
        inferred = infer_shapes(model, strict=False)
    except Exception:  # noqa: BLE001 - shape inference is a help here, not a requirement
        inferred = model
    info: dict[str, tuple[int, tuple]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            tt = vi.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim) if tt.HasField(
                "shape") else None
            info[vi.name] = (tt.elem_type, shape)
    return info


def plan_groups(sizes: dict[str, int], budget_bytes: int) -> list[list[str]]:
    """Greedy grouping of tensors (bytes per batch each) into groups of at most ``budget_bytes`` (one tensor at least)."""
    groups: list[list[str]] = []
    cur: list[str] = []
    used = 0
    for name, size in sizes.items():
        if cur and used + size > budget_bytes:
            groups.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += size
    if cur:
        groups.append(cur)
    return groups


_OFFSET_INPUT = "__onnxopt_calib_offset"


def augment(model: onnx.ModelProto, tensors: list[str], info: dict[str, tuple[int, tuple]], subsample: int,
            batch: int) -> tuple[onnx.ModelProto, dict[str, tuple[str, str | None, str | None]], dict[str, int]]:
    """A copy of ``model`` whose outputs are, per tensor: values (all, or a strided subset), min and max.

    The subset of a tensor of ``size`` values is every ``stride``-th value of the flattened tensor, ``stride =
    max(size // (subsample * batch), 1)``, from ``offset mod stride`` on (``offset`` moves from batch to batch). When
    ``info`` gives the tensor's full shape, the stride is a constant and the start is fed as an input of its own
    (``offset mod stride``, computed by the caller); otherwise both are computed in the graph from the tensor's size
    and the ``_OFFSET_INPUT``. The values are the same either way; the constant form saves five small ops per tensor
    and batch.

    Returns the model, ``{tensor: (values output, min output or None, max output or None)}`` and ``{start input:
    stride}`` for the tensors with constant strides.
    """
    from onnxopt.model import default_opset

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    del g.output[:]
    opset = default_opset(m) or 13
    taken = {n for node in g.node for n in list(node.input) + list(node.output)} | {i.name for i in g.input} | {
        t.name for t in g.initializer}

    def fresh(base: str) -> str:
        return fresh_name(base, taken)

    use_graph_ops = opset >= 10
    outputs: dict[str, tuple[str, str | None, str | None]] = {}
    starts: dict[str, int] = {}
    need_offset = False
    consts: dict[str, str] = {}

    def const(key: str, value: np.ndarray) -> str:
        if key not in consts:
            name = fresh(f"__onnxopt_calib_{key}")
            g.initializer.append(onnx.numpy_helper.from_array(value, name))
            consts[key] = name
        return consts[key]

    for t in tensors:
        elem = info.get(t, (TensorProto.FLOAT, None))[0]
        if not (use_graph_ops and elem == TensorProto.FLOAT):
            # Full values; min/max in numpy.
            g.output.append(helper.make_tensor_value_info(t, elem or TensorProto.FLOAT, None))
            outputs[t] = (t, None, None)
            continue
        mn, mx = fresh(f"{t}__min"), fresh(f"{t}__max")
        g.node.append(helper.make_node("ReduceMin", [t], [mn], name=fresh(f"{t}__reducemin"), keepdims=0))
        g.node.append(helper.make_node("ReduceMax", [t], [mx], name=fresh(f"{t}__reducemax"), keepdims=0))
        values = t
        shape = info.get(t, (elem, None))[1]
        static = shape is not None and all(isinstance(d, int) and d > 0 for d in shape)
        if subsample > 0 and static:
            stride = max(int(np.prod(shape, dtype=np.int64)) // (subsample * batch), 1)
            minus1 = const("flat_shape", np.array([-1], dtype=np.int64))
            flat = fresh(f"{t}__flat")
            g.node.append(helper.make_node("Reshape", [t, minus1], [flat], name=fresh(f"{t}__reshape")))
            values = flat
            if stride > 1:
                start, sub = fresh(f"{_OFFSET_INPUT}_{t}"), fresh(f"{t}__sub")
                big = const("end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
                axis0 = const("axis0", np.array([0], dtype=np.int64))
                step = const(f"stride{stride}", np.array([stride], dtype=np.int64))
                g.input.append(helper.make_tensor_value_info(start, TensorProto.INT64, [1]))
                g.node.append(helper.make_node("Slice", [flat, start, big, axis0, step], [sub],
                                               name=fresh(f"{t}__slice")))
                starts[start] = stride
                values = sub
        elif subsample > 0:
            need_offset = True
            flat, size, stride, step1, start = (fresh(f"{t}__{k}") for k in ("flat", "size", "stride", "step", "start"))
            sub = fresh(f"{t}__sub")
            per_batch = const("budget", np.array(subsample * batch, dtype=np.int64))
            one = const("one", np.array(1, dtype=np.int64))
            minus1 = const("flat_shape", np.array([-1], dtype=np.int64))
            big = const("end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
            axis0 = const("axis0", np.array([0], dtype=np.int64))
            shape1 = const("shape1", np.array([1], dtype=np.int64))
            q = fresh(f"{t}__quot")
            g.node.extend([
                helper.make_node("Reshape", [t, minus1], [flat], name=fresh(f"{t}__reshape")),
                helper.make_node("Size", [t], [size], name=fresh(f"{t}__sizeop")),
                helper.make_node("Div", [size, per_batch], [q], name=fresh(f"{t}__div")),
                helper.make_node("Max", [q, one], [stride], name=fresh(f"{t}__max1")),
                helper.make_node("Reshape", [stride, shape1], [step1], name=fresh(f"{t}__step1")),
                helper.make_node("Mod", [_OFFSET_INPUT, step1], [start], name=fresh(f"{t}__mod")),
                helper.make_node("Slice", [flat, start, big, axis0, step1], [sub], name=fresh(f"{t}__slice")),
            ])
            values = sub
        g.output.append(helper.make_tensor_value_info(values, TensorProto.FLOAT, None))
        g.output.append(helper.make_tensor_value_info(mn, TensorProto.FLOAT, None))
        g.output.append(helper.make_tensor_value_info(mx, TensorProto.FLOAT, None))
        outputs[t] = (values, mn, mx)
    if need_offset:
        g.input.append(helper.make_tensor_value_info(_OFFSET_INPUT, TensorProto.INT64, [1]))
    return m, outputs, starts


def plan(model: onnx.ModelProto, tensors: list[str], *, batch: int, subsample: int = DEFAULT_SUBSAMPLE,
         memory_mb: float = DEFAULT_MEMORY_MB, info: dict | None = None) -> CollectPlan:
    """Split ``tensors`` into groups whose outputs per batch fit in ``memory_mb``."""
    info = info if info is not None else tensor_info(model)
    known: dict[str, int | None] = {}
    for t in tensors:
        elem, shape = info.get(t, (TensorProto.FLOAT, None))
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem).itemsize if elem else 4
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            known[t] = None  # unknown size: assume the largest known one
        else:
            known[t] = int(np.prod(shape[1:], dtype=np.int64)) * itemsize  # axis 0 is the batch axis
    worst = max([v for v in known.values() if v is not None], default=4 << 20)
    sizes = {}
    for t, per_sample in known.items():
        per_sample = worst if per_sample is None else per_sample
        if subsample > 0 and info.get(t, (TensorProto.FLOAT,))[0] == TensorProto.FLOAT:
            per_sample = min(per_sample, 2 * subsample * 4)
        sizes[t] = per_sample * batch
    return CollectPlan(plan_groups(sizes, int(memory_mb * (1 << 20))), subsample)


def collect(
    model: onnx.ModelProto,
    tensors: list[str],
    source: Any,
    *,
    subsample: int = DEFAULT_SUBSAMPLE,
    memory_mb: float = DEFAULT_MEMORY_MB,
    bins: int = NUM_BINS,
    progress: bool = False,
    batch_size: int | None = None,
    on_plan: Callable[[CollectPlan], None] | None = None,
    info: dict[str, tuple[int, tuple]] | None = None,
    weights: dict[str, np.ndarray] | None = None,
) -> dict[str, RangeCollector]:
    """Run ``model`` over the calibration ``source`` and collect the statistics of ``tensors``.

    ``source`` is a calibration source (see :mod:`onnxopt.calibration`); ``batch_size`` overrides its batching for
    inputs with a dynamic batch dim. ``info`` (``tensor_info`` of the model, or of its weight-stripped skeleton, which
    is much faster to infer) gives element types and shapes. ``weights``: the real values of initializers that
    ``model`` holds as stubs (a :func:`onnxopt.model.graph_skeleton`, see :func:`skeleton_weights`); they go to ONNX
    Runtime from memory, which saves exporting and serializing the full model. Returns one :class:`RangeCollector`
    per tensor.
    """
    from onnxopt.model import tensor_bytes  # from dims: a skeleton's stubs count at their real size
    from onnxopt.validate import session

    collectors = {t: RangeCollector(bins) for t in tensors}
    if not tensors:
        return collectors
    n_samples = len(source)
    bs = getattr(source, "_static_batch", None) or batch_size or getattr(source, "batch_size", 1)
    info = info if info is not None else tensor_info(model)
    the_plan = plan(model, tensors, batch=bs, subsample=subsample, memory_mb=memory_mb, info=info)
    n_sess, threads = parallel_sessions(-(-n_samples // bs), tensor_bytes(model), memory_mb)
    if n_sess > 1:
        # n_sess batches in flight: each gets its share of the budget, unless that costs extra passes over the data.
        shared = plan(model, tensors, batch=bs, subsample=subsample, memory_mb=memory_mb / n_sess, info=info)
        if len(shared.groups) == len(the_plan.groups):
            the_plan = shared
        else:
            n_sess, threads = 1, None
    if on_plan:
        on_plan(the_plan)
    bar = ProgressBar(progress, n_samples * len(the_plan.groups), "calibrating")
    try:
        for gi, group in enumerate(the_plan.groups):
            aug, outs, starts = augment(model, group, info, subsample, bs)
            if weights:
                _as_external(aug, weights)
            names = [o.name for o in aug.graph.output]
            wants_offset = any(i.name == _OFFSET_INPUT for i in aug.graph.input)
            batches = source.batches(batch_size) if hasattr(source, "batches") else iter(source)
            local = threading.local()

            def run(bi: int, feeds: dict[str, np.ndarray], aug=aug, names=names, local=local) -> list:
                sess = getattr(local, "sess", None)
                if sess is None:  # one session per worker thread, made by the thread itself (in parallel)
                    sess = local.sess = session(aug, optimize=True, initializers=weights, threads=threads)
                try:
                    return sess.run(names, feeds)
                except Exception as e:  # noqa: BLE001 - ORT raises its own types
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise OnnxoptError(f"calibration: ONNX Runtime failed on batch {bi}: {msg}") from e

            def update(result: list, group=group, outs=outs, names=names) -> None:
                values = dict(zip(names, result))
                for t in group:
                    vname, mn, mx = outs[t]
                    lo = float(values[mn]) if mn else None
                    hi = float(values[mx]) if mx else None
                    collectors[t].update(values[vname], lo, hi)

            # ONNX Runtime runs the batches in worker threads (it releases the GIL), n_sess at a time; this thread
            # updates the histograms with each batch's values in batch order while the next batches run.
            with ThreadPoolExecutor(max_workers=n_sess) as pool:
                inflight: deque = deque()
                for bi, feeds in enumerate(batches):
                    if wants_offset or starts:
                        offset = bi * 7919 + 1
                        feeds = dict(feeds)
                        if wants_offset:
                            feeds[_OFFSET_INPUT] = np.array([offset], dtype=np.int64)
                        for name, stride in starts.items():
                            feeds[name] = np.array([offset % stride], dtype=np.int64)
                    inflight.append((pool.submit(run, bi, feeds), _batch_len(feeds, source)))
                    if len(inflight) > n_sess:
                        future, n = inflight.popleft()
                        update(future.result())
                        bar.advance(n, f"group {gi + 1}/{len(the_plan.groups)}")
                while inflight:
                    future, n = inflight.popleft()
                    update(future.result())
                    bar.advance(n, f"group {gi + 1}/{len(the_plan.groups)}")
    finally:
        bar.close()
    return collectors


#: At most this many ONNX Runtime sessions run calibration batches side by side.
MAX_SESSIONS = 4


def parallel_sessions(n_batches: int, weight_bytes: int, memory_mb: float) -> tuple[int, int | None]:
    """How many ONNX Runtime sessions run calibration batches side by side, and each one's intra-op threads (None:
    ONNX Runtime's default, one per core).

    Calibration is throughput work. One session per core, each on one thread and each on its own batch, keeps the
    cores busy without the per-op synchronisation of a multi-threaded session, in which every op waits for its
    slowest thread: the reductions and slices added for calibration are many small ops, and on a shared machine a
    thread is often late. Zoo ResNet-18 on 2 cores, 128 samples: the calibration model runs 1.17x the time of a bare
    forward pass as one 2-thread session, 1.04x as two 1-thread sessions. The outputs are the same bit for bit (ONNX
    Runtime's CPU kernels split work over output elements, not over the terms of a sum). Each extra session holds a
    copy of the weights: only as many as fit in ``memory_mb``.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    fit = 1 + int(memory_mb * (1 << 20) // max(weight_bytes, 1))
    n = max(1, min(cpus, MAX_SESSIONS, n_batches, fit))
    return (1, None) if n == 1 else (n, max(1, cpus // n))


def skeleton_weights(graph: Any, skeleton: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``{name: value}`` of the initializers that ``skeleton`` (:func:`onnxopt.model.graph_skeleton` of ``graph``)
    holds as stubs: those whose data does not fill their dims."""
    import onnx_graphsurgeon as gs

    tensors = graph.tensors()
    out: dict[str, np.ndarray] = {}
    for init in skeleton.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL or not init.HasField("raw_data"):
            continue
        n = int(np.prod(init.dims, dtype=np.int64))
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        if len(init.raw_data) != n * itemsize:
            t = tensors.get(init.name)
            if not isinstance(t, gs.Constant):
                raise OnnxoptError(f"calibration: no value for the stub initializer {init.name!r}")
            out[init.name] = np.asarray(t.values)
    return out


def _as_external(model: onnx.ModelProto, names: dict[str, Any]) -> None:
    """Declare the initializers ``names`` of ``model`` as external data (their values are handed over from memory)."""
    for init in model.graph.initializer:
        if init.name in names:
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            init.external_data.add(key="location", value="onnxopt-in-memory")


def _batch_len(feeds: dict[str, np.ndarray], source: Any) -> int:
    static = getattr(source, "_static_batch", None)
    if static:
        return static
    for v in feeds.values():
        if getattr(v, "ndim", 0):
            return int(v.shape[0])
    return 1


def ranges(collectors: dict[str, RangeCollector], method: str, *, percentile: float = 99.99,
           symmetric: bool = True, entropy_guard: float = DEFAULT_ENTROPY_GUARD) -> dict[str, tuple[float, float]]:
    """``{tensor: (lo, hi)}`` for every collector."""
    return {t: c.range(method, percentile=percentile, symmetric=symmetric, entropy_guard=entropy_guard)
            for t, c in collectors.items()}


__all__ = [
    "RangeCollector", "collect", "plan", "plan_groups", "augment", "ranges", "skeleton_weights", "parallel_sessions",
    "threshold_percentile", "threshold_entropy", "threshold_mse", "kl_divergences", "expected_mse", "METHODS",
    "NUM_BINS", "DEFAULT_SUBSAMPLE", "DEFAULT_MEMORY_MB", "MAX_SESSIONS",
]
