"""INT8 quantization building blocks: placement, scales, Q/DQ insertion, calibration cache, evaluation, plots.

The ``quantize`` pass (``passes/quantize.py``) strings these together; ``onnxopt quantize`` (``cli_quantize.py``) uses
the evaluation helpers.

Placement (:func:`find_sites`)
------------------------------
*Compute* ops are Conv, ConvTranspose, Gemm and MatMul. Their float activation inputs get a QuantizeLinear ->
DequantizeLinear pair; their constant weight becomes an int8 initializer followed by a DequantizeLinear (per-channel,
symmetric: axis 0 for Conv, 1 for ConvTranspose, the output axis for Gemm/MatMul weights). An Add whose one input comes
from a quantized Conv gets a Q/DQ pair on its *other* (residual) input, so that TensorRT fuses the add into the conv.
Nothing is inserted between a compute op and the BatchNormalization/activation that follows it, and graph outputs are
never quantized (a tensor that is a graph output keeps its float producer; only consumers inside the graph are
rewired). For ``target=onnxruntime`` the output of each compute op (or of the single Relu/Clip that follows it) is
quantized too, because ONNX Runtime only fuses a ``DQ -> Conv -> Q`` unit into its integer kernels.

Tensors linked by Concat (inputs and output) or MaxPool (input and output) share one scale when several of them are
quantized: TensorRT requires it to keep those layers in INT8 without requantizing.

Scales
------
``tensorrt``: activations int8, symmetric, zero point 0, ``scale = T / 127``. ``onnxruntime``: activations uint8,
asymmetric (a never-negative tensor gets the full 0..255 for ``[0, T]``), the layout ONNX Runtime's x86 kernels use.
Weights int8 symmetric, ``scale = max|W_c| / 127`` (``/ 63`` with 7-bit weights, the fix for x86 CPUs without VNNI
whose u8 x s8 kernels saturate their 16-bit pair sums). Bias: float for TensorRT; int32 with ``scale = s_x * s_w``
for ONNX Runtime (its QLinearConv needs it).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import OptionsError, PreconditionError
from onnxopt.graphutil import const_value, constant_producer, is_constant, producer

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: Ops after which an output quantization point moves (ONNX Runtime drops them into the Q's clamp).
ACTIVATION_OPS = ("Relu", "Clip")
#: Ops whose inputs and output must share one scale when quantized (TensorRT).
SHARED_SCALE_OPS = ("Concat", "MaxPool")

CACHE_VERSION = 1


# -- placement -------------------------------------------------------------------------------------------------------

@dataclass
class Site:
    """One node that gets quantized inputs."""

    index: int                    # position in graph.nodes at planning time (copies keep the order)
    name: str                     # node name (or op#index when unnamed)
    op: str
    kind: str                     # "compute" | "residual"
    acts: list[int]               # input indices quantized as activations
    weight: int | None = None     # input index of the constant weight
    axis: int | None = None       # per-channel axis of the weight
    bias: int | None = None       # input index of a 1-D constant bias


@dataclass
class Placement:
    sites: list[Site]
    outputs: list[tuple[str, str]]         # (site name, tensor) quantized as compute outputs (onnxruntime)
    skipped: dict[str, int] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)

    def activation_tensors(self, graph: gs.Graph) -> list[str]:
        """Every activation tensor the placement quantizes, in graph order."""
        seen: dict[str, None] = {}
        nodes = graph.nodes
        for s in self.sites:
            for k in s.acts:
                seen.setdefault(nodes[s.index].inputs[k].name, None)
        for _, t in self.outputs:
            seen.setdefault(t, None)
        return list(seen)


def node_label(node: gs.Node, index: int) -> str:
    return node.name or f"{node.op}#{index}"


def _is_float(t: gs.Tensor) -> bool:
    return t.dtype is None or np.dtype(t.dtype) == np.float32


def _matches(node: gs.Node, label: str, patterns: Iterable[str]) -> bool:
    for p in patterns:
        if p == node.op or fnmatch.fnmatchcase(label, p):
            return True
    return False


def weight_axis(node: gs.Node, weight_index: int, rank: int) -> int | None:
    """Per-channel axis of a compute op's constant input: the output-channel axis."""
    op = node.op
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        if weight_index == 1:
            return 0 if node.attrs.get("transB", 0) else 1
        return None  # a constant A: per-tensor
    if op == "MatMul":
        return rank - 1 if weight_index == 1 and rank >= 2 else None
    return None


def find_sites(graph: gs.Graph, *, target: str, exclude: tuple[str, ...] = (), skip_first_last: bool = False,
               apply_exclusions: bool = True) -> Placement:
    """Where Q/DQ pairs go (see the module doc). With ``apply_exclusions=False`` every candidate is kept (the set
    of tensors to calibrate, so that a calibration cache serves any later exclusion)."""
    nodes = graph.nodes
    outputs = {t.name for t in graph.outputs}
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[f"skipped_{reason}"] = skipped.get(f"skipped_{reason}", 0) + 1

    compute: list[Site] = []
    for i, n in enumerate(nodes):
        if n.op not in COMPUTE_OPS or n.domain not in (None, "", "ai.onnx"):
            continue
        label = node_label(n, i)
        ins = [t for t in n.inputs]
        main = ins[:2]
        if len(main) < 2 or any(t is None or t.name == "" for t in main):
            skip("malformed")
            continue
        if not all(_is_float(t) for t in main):
            skip("not_float32")
            continue
        consts = [is_constant(t) for t in main]
        acts: list[int] = []
        weight = None
        if n.op in ("Conv", "ConvTranspose"):
            if not consts[1]:
                skip("dynamic_weight")
                continue
            if consts[0]:
                skip("constant_input")
                continue
            acts, weight = [0], 1
        else:  # Gemm, MatMul
            if consts[0] and consts[1]:
                skip("constant_input")
                continue
            for k in (0, 1):
                if consts[k]:
                    weight = k
                else:
                    acts.append(k)
        axis = None
        if weight is not None:
            w = const_value(main[weight])
            if w is None or w.dtype != np.float32:
                skip("not_float32")
                continue
            axis = weight_axis(n, weight, w.ndim)
        bias = None
        if n.op in ("Conv", "ConvTranspose") and len(ins) > 2 and ins[2] is not None and ins[2].name:
            bias = 2 if is_constant(ins[2]) else None
        if n.op == "Gemm" and len(ins) > 2 and ins[2] is not None and ins[2].name and is_constant(ins[2]):
            c = const_value(ins[2])
            bias = 2 if c is not None and c.ndim == 1 and weight == 1 and axis is not None else None
        compute.append(Site(i, label, n.op, "compute", acts, weight, axis, bias))

    # first/last compute layers: no compute op upstream / downstream
    first_last: set[int] = set()
    if skip_first_last and compute:
        first_last = _first_last(graph, {s.index for s in compute})
    kept: list[Site] = []
    excluded: list[str] = []
    for s in compute:
        n = nodes[s.index]
        if apply_exclusions and _matches(n, s.name, exclude):
            skip("excluded")
            excluded.append(s.name)
            continue
        if apply_exclusions and s.index in first_last:
            skip("first_last")
            excluded.append(s.name)
            continue
        kept.append(s)

    quantized_convs = {id(nodes[s.index]) for s in kept if s.op == "Conv"}
    residual: list[Site] = []
    for i, n in enumerate(nodes):
        if n.op != "Add" or len(n.inputs) != 2 or any(is_constant(t) for t in n.inputs):
            continue
        if not all(_is_float(t) for t in n.inputs):
            continue
        label = node_label(n, i)
        if apply_exclusions and _matches(n, label, exclude):
            continue
        prods = [producer(t) for t in n.inputs]
        fused = next((k for k in (0, 1) if prods[k] is not None and id(prods[k]) in quantized_convs
                      and len(n.inputs[k].outputs) == 1 and n.inputs[k].name not in outputs), None)
        if fused is None:
            continue
        residual.append(Site(i, label, "Add", "residual", [1 - fused]))

    outs: list[tuple[str, str]] = []
    if target == "onnxruntime":
        for s in kept:
            t = nodes[s.index].outputs[0]
            consumers = list(t.outputs)
            if len(consumers) == 1 and consumers[0].op in ACTIVATION_OPS and t.name not in outputs:
                t = consumers[0].outputs[0]
            if t.outputs and _is_float(t):
                outs.append((s.name, t.name))
    sites = sorted(kept + residual, key=lambda s: s.index)
    return Placement(sites, outs, skipped, excluded)


def _first_last(graph: gs.Graph, compute: set[int]) -> set[int]:
    """Compute nodes with no compute node upstream (first) or downstream (last)."""
    nodes = graph.nodes
    index = {id(n): i for i, n in enumerate(nodes)}

    def reach(start: int, forward: bool) -> bool:
        stack = [nodes[start]]
        seen: set[int] = set()
        while stack:
            n = stack.pop()
            nexts = ([c for t in n.outputs for c in t.outputs] if forward
                     else [p for t in n.inputs if not isinstance(t, gs.Constant) for p in t.inputs])
            for m in nexts:
                j = index.get(id(m))
                if j is None or j in seen:
                    continue
                if j in compute:
                    return True
                seen.add(j)
                stack.append(m)
        return False

    return {i for i in compute if not reach(i, False) or not reach(i, True)}


def shared_scale_groups(graph: gs.Graph, quantized: Iterable[str]) -> list[list[str]]:
    """Groups of quantized tensors that must share a scale (linked through Concat / MaxPool)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb

    for n in graph.nodes:
        if n.op in SHARED_SCALE_OPS and n.outputs:
            out = n.outputs[0].name
            for t in n.inputs if n.op == "Concat" else n.inputs[:1]:
                if t is not None and t.name and not isinstance(t, gs.Constant):
                    union(out, t.name)
    groups: dict[str, list[str]] = {}
    for t in quantized:
        groups.setdefault(find(t), []).append(t)
    return [g for g in groups.values() if len(g) > 1]


# -- scales ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActParams:
    scale: float
    zero_point: int
    dtype: type  # np.int8 or np.uint8


def activation_params(lo: float, hi: float, target: str) -> ActParams:
    """Scale and zero point of an activation range (see the module doc)."""
    if target == "tensorrt":
        t = max(abs(lo), abs(hi))
        return ActParams(float(t / 127.0) if t > 0 else 1.0, 0, np.int8)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return ActParams(1.0, 0, np.uint8)
    s = (hi - lo) / 255.0
    zp = int(np.clip(np.round(-lo / s), 0, 255))
    return ActParams(float(s), zp, np.uint8)


def quantize_weight(w: np.ndarray, axis: int | None, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights: (int8 values, float32 scales), per channel along ``axis`` (None: one scale)."""
    levels = (1 << (bits - 1)) - 1
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        amax = np.array(np.abs(w).max() if w.size else 0.0, dtype=np.float32)
        scale = np.where(amax > 0, amax / levels, 1.0).astype(np.float32)
        q = np.clip(np.round(w / scale), -levels, levels).astype(np.int8)
        return q, scale
    red = tuple(a for a in range(w.ndim) if a != axis)
    amax = np.abs(w).max(axis=red) if w.size else np.zeros(w.shape[axis], np.float32)
    scale = np.where(amax > 0, amax / levels, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -levels, levels).astype(np.int8)
    return q, scale


# -- insertion -------------------------------------------------------------------------------------------------------

@dataclass
class WeightEntry:
    dq: gs.Node
    float_value: np.ndarray
    axis: int | None


@dataclass
class BiasEntry:
    dq: gs.Node
    float_value: np.ndarray
    act_scale: float
    weight: WeightEntry


@dataclass
class Inserted:
    """What :func:`insert_qdq` added (kept to requantize the weights with fewer bits)."""

    weights: list[WeightEntry] = field(default_factory=list)
    biases: list[BiasEntry] = field(default_factory=list)
    activations: dict[str, ActParams] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)   # quantized node labels
    float_bias: int = 0


class _Namer:
    def __init__(self, graph: gs.Graph) -> None:
        self.taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def insert_qdq(graph: gs.Graph, placement: Placement, params: dict[str, ActParams], *, target: str,
               weight_bits: int = 8, per_channel: bool = True, int32_bias: bool = False,
               only: set[str] | None = None) -> Inserted:
    """Insert Q/DQ pairs and int8 weights into ``graph`` for the sites of ``placement`` (``only``: the site names to
    quantize). New nodes go right before the first node that reads them, which keeps the node order topological."""
    namer = _Namer(graph)
    nodes = list(graph.nodes)
    position = {id(n): i for i, n in enumerate(nodes)}
    before: dict[int, list[gs.Node]] = {}
    done = Inserted()
    selected = [s for s in placement.sites if only is None or s.name in only]

    # 1. activations: every (consumer, input index) to rewire, per tensor
    uses: dict[str, list[tuple[gs.Node, int]]] = {}
    tensor_of: dict[str, gs.Tensor] = {}
    for s in selected:
        n = nodes[s.index]
        for k in s.acts:
            t = n.inputs[k]
            uses.setdefault(t.name, []).append((n, k))
            tensor_of[t.name] = t
    if placement.outputs:
        tensors = graph.tensors()
        for site_name, name in placement.outputs:
            if only is not None and site_name not in only:
                continue
            t = tensors.get(name)
            if t is None:
                continue
            tensor_of[name] = t
            lst = uses.setdefault(name, [])
            for c in t.outputs:
                if id(c) not in position:
                    continue
                for k, inp in enumerate(c.inputs):
                    if inp is t and (c, k) not in lst:
                        lst.append((c, k))
    act_scale: dict[str, float] = {}
    for name, consumers in uses.items():
        if not consumers:
            continue
        t = tensor_of[name]
        p = params[name]
        scale = gs.Constant(namer(f"{name}_scale"), np.array(p.scale, dtype=np.float32))
        zp = gs.Constant(namer(f"{name}_zp"), np.array(p.zero_point, dtype=p.dtype))
        q_out = gs.Variable(namer(f"{name}_q"))
        dq_out = gs.Variable(namer(f"{name}_dq"))
        q = gs.Node("QuantizeLinear", namer(f"{name}_Q"), inputs=[t, scale, zp], outputs=[q_out])
        dq = gs.Node("DequantizeLinear", namer(f"{name}_DQ"), inputs=[q_out, scale, zp],
                     outputs=[dq_out])
        at = min(position[id(c)] for c, _ in consumers)
        before.setdefault(at, []).extend([q, dq])
        for c, k in consumers:
            c.inputs[k] = dq_out
        done.activations[name] = p
        act_scale[name] = p.scale

    # 2. weights (and int32 biases), before the first quantized node that reads them
    w_dq: dict[tuple[str, int | None], tuple[gs.Variable, WeightEntry]] = {}
    b_dq: dict[tuple[str, str], gs.Variable] = {}
    replaced: list[gs.Tensor] = []
    for s in selected:
        n = nodes[s.index]
        done.nodes.append(s.name)
        if s.weight is None:
            continue
        t = n.inputs[s.weight]
        ax = s.axis if per_channel else None
        key = (t.name, ax)
        if key not in w_dq:
            w = np.asarray(const_value(t), dtype=np.float32)
            q, sc = quantize_weight(w, ax, weight_bits)
            qc = gs.Constant(namer(f"{t.name}_int8"), q)
            scc = gs.Constant(namer(f"{t.name}_scale"), sc)
            zc = gs.Constant(namer(f"{t.name}_zp"), np.zeros(sc.shape, dtype=np.int8))
            out = gs.Variable(namer(f"{t.name}_dq"))
            dq = gs.Node("DequantizeLinear", namer(f"{t.name}_DQ"),
                         attrs={"axis": int(ax)} if ax is not None else {}, inputs=[qc, scc, zc], outputs=[out])
            before.setdefault(s.index, []).append(dq)
            entry = WeightEntry(dq, w, ax)
            done.weights.append(entry)
            w_dq[key] = (out, entry)
            replaced.append(t)
        out, entry = w_dq[key]
        n.inputs[s.weight] = out
        if s.bias is None:
            continue
        src = _act_source(n.inputs[s.acts[0]]) if len(s.acts) == 1 else None
        if int32_bias and src in act_scale:
            bt = n.inputs[s.bias]
            bkey = (bt.name, entry.dq.name)
            if bkey not in b_dq:
                b = np.asarray(const_value(bt), dtype=np.float32)
                qb, sb = quantize_bias(b, act_scale[src], np.asarray(entry.dq.inputs[1].values))
                qc = gs.Constant(namer(f"{bt.name}_int32"), qb)
                scc = gs.Constant(namer(f"{bt.name}_scale"), sb)
                zc = gs.Constant(namer(f"{bt.name}_zp"), np.zeros(sb.shape, dtype=np.int32))
                bout = gs.Variable(namer(f"{bt.name}_dq"))
                dq = gs.Node("DequantizeLinear", namer(f"{bt.name}_DQ"), attrs={"axis": 0},
                             inputs=[qc, scc, zc], outputs=[bout])
                before.setdefault(s.index, []).append(dq)
                done.biases.append(BiasEntry(dq, b, act_scale[src], entry))
                b_dq[bkey] = bout
                replaced.append(bt)
            n.inputs[s.bias] = b_dq[bkey]
        else:
            done.float_bias += 1

    new_nodes: list[gs.Node] = []
    for i, n in enumerate(nodes):
        new_nodes.extend(before.get(i, []))
        new_nodes.append(n)
    graph.nodes = new_nodes
    _drop_dead_constant_nodes(graph, replaced)
    return done


def _act_source(t: gs.Tensor) -> str:
    """The float tensor a DequantizeLinear output stands for (DQ <- Q <- tensor)."""
    dq = producer(t)
    if dq is not None and dq.op == "DequantizeLinear":
        q = producer(dq.inputs[0])
        if q is not None and q.op == "QuantizeLinear":
            return q.inputs[0].name
    return t.name


def quantize_bias(b: np.ndarray, act_scale: float, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with ``scale = act_scale * w_scale`` (one scale per output channel)."""
    s = (np.float32(act_scale) * np.asarray(w_scale, dtype=np.float32)).astype(np.float32)
    if s.ndim == 0:
        s = np.full(b.shape, s, dtype=np.float32)
    s = np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
    lim = np.iinfo(np.int32)
    q = np.clip(np.round(b.astype(np.float64) / s), lim.min, lim.max).astype(np.int32)
    return q, s


def requantize_weights(done: Inserted, bits: int) -> None:
    """Replace every inserted weight (and int32 bias) by its ``bits``-bit version, in place (new arrays)."""
    for e in done.weights:
        q, s = quantize_weight(e.float_value, e.axis, bits)
        qc, sc, zc = e.dq.inputs
        e.dq.inputs[0] = gs.Constant(qc.name, q)
        e.dq.inputs[1] = gs.Constant(sc.name, s)
    for b in done.biases:
        q, s = quantize_bias(b.float_value, b.act_scale, np.asarray(b.weight.dq.inputs[1].values))
        qc, sc, zc = b.dq.inputs
        b.dq.inputs[0] = gs.Constant(qc.name, q)
        b.dq.inputs[1] = gs.Constant(sc.name, s)


def _drop_dead_constant_nodes(graph: gs.Graph, tensors: list[gs.Tensor]) -> None:
    outs = {t.name for t in graph.outputs}
    dead = set()
    for t in tensors:
        node = constant_producer(t)
        if node is not None and not t.outputs and t.name not in outs:
            dead.add(id(node))
    if dead:
        graph.nodes = [n for n in graph.nodes if id(n) not in dead]


# -- calibration cache -----------------------------------------------------------------------------------------------

def model_hash(model: onnx.ModelProto) -> str:
    """sha256 of the graph (nodes, weights, inputs/outputs) and the opsets; the model's name and docs do not count."""
    h = hashlib.sha256()
    h.update(model.graph.SerializeToString(deterministic=True))
    for imp in sorted((i.domain, i.version) for i in model.opset_import):
        h.update(repr(imp).encode())
    return h.hexdigest()


def data_key(source: Any) -> str | None:
    """What identifies the calibration data (file/spec, sample count, randomness)."""
    if source is None:
        return None
    desc = getattr(source, "description", type(source).__name__)
    path = getattr(source, "path", None)
    if path is not None:
        desc = f"{desc} ({Path(path).resolve()})"
    rnd = f", random seed {getattr(source, 'seed', 0)}" if getattr(source, "is_random", False) else ""
    return f"{desc}; {len(source)} samples{rnd}"


def load_cache(path: str | os.PathLike, mhash: str, data: str | None):
    """Collector states from a cache file made for this model (and this data, when data is given).

    Returns ``{tensor: RangeCollector}``, or None when the file does not exist. A cache made for another model or
    other data is refused with a PreconditionError.
    """
    from onnxopt.collectors import RangeCollector

    p = Path(path)
    if not p.exists():
        return None
    try:
        doc = json.loads(p.read_text())
        if doc.get("version") != CACHE_VERSION:
            raise ValueError(f"version {doc.get('version')!r}, expected {CACHE_VERSION}")
        states = doc["tensors"]
        cached_hash = doc["model_sha256"]
        cached_data = doc.get("data")
        collectors = {name: RangeCollector.from_state(s) for name, s in states.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PreconditionError(f"calibration cache {p} is not readable ({e}); delete it to recalibrate") from e
    if cached_hash != mhash:
        raise PreconditionError(
            f"calibration cache {p} is stale: it was made for another model (sha256 {cached_hash[:12]}..., this model "
            f"is {mhash[:12]}...); delete it or give another --calib-cache path")
    if data is not None and cached_data is not None and cached_data != data:
        raise PreconditionError(
            f"calibration cache {p} is stale: it was made with other calibration data ({cached_data}); now: {data}. "
            "Delete it or give another path")
    return collectors


def save_cache(path: str | os.PathLike, mhash: str, data: str | None, collectors: dict, meta: dict) -> None:
    from onnxopt.report import write_json

    doc = {"version": CACHE_VERSION, "model_sha256": mhash, "data": data, **meta,
           "tensors": {name: c.state() for name, c in collectors.items()}}
    p = Path(path)
    if not p.parent.is_dir() and str(p.parent):
        raise OptionsError(f"calib_cache {p}: folder {p.parent} does not exist")
    write_json(doc, p)


# -- evaluation ------------------------------------------------------------------------------------------------------

def run_batched(sess: Any, feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Run a session over feeds with a leading sample axis, ``batch`` samples at a time; outputs concatenated."""
    from onnxopt.validate import run

    n = next(iter(feeds.values())).shape[0]
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, batch):
        out = run(sess, {k: v[i:i + batch] for k, v in feeds.items()})
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) if v[0].ndim else v[0] for k, v in parts.items()}


def is_classifier_output(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[1] > 1


@dataclass
class ModeMetrics:
    """Quality of one model run against the float model on the evaluation feeds."""

    cosine: dict[str, float]
    sqnr_db: dict[str, float]
    top1_agreement: float | None = None
    accuracy: float | None = None

    def summary(self) -> str:
        parts = [f"cosine {min(self.cosine.values()):.5f}", f"SQNR {min(self.sqnr_db.values()):.1f} dB"]
        if self.top1_agreement is not None:
            parts.append(f"top-1 agreement {100 * self.top1_agreement:.2f}%")
        if self.accuracy is not None:
            parts.append(f"accuracy {100 * self.accuracy:.2f}%")
        return ", ".join(parts)


def compare_to_float(ref: dict[str, np.ndarray], new: dict[str, np.ndarray],
                     labels: np.ndarray | None = None) -> ModeMetrics:
    from onnxopt.validate import output_metrics

    cos, sq = {}, {}
    for k, r in ref.items():
        m = output_metrics(k, r, new[k])
        cos[k], sq[k] = m.cosine, m.sqnr_db
    first = next(iter(ref))
    agree = acc = None
    if is_classifier_output(ref[first]):
        agree = float(np.mean(ref[first].argmax(1) == new[first].argmax(1)))
        if labels is not None and len(labels) == len(new[first]):
            acc = float(np.mean(new[first].argmax(1) == labels))
    return ModeMetrics(cos, sq, agree, acc)


def accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray | None) -> float | None:
    first = next(iter(outputs.values()))
    if labels is None or not is_classifier_output(first) or len(labels) != len(first):
        return None
    return float(np.mean(first.argmax(1) == labels))


def modes_disagree(ref: dict[str, np.ndarray], deploy: dict[str, np.ndarray], *, min_cosine: float = 0.999,
                   min_agreement: float = 0.99) -> str | None:
    """Why the deployment run disagrees with the reference run of the same int8 model, or None."""
    m = compare_to_float(ref, deploy)
    bad = [f"{k}: cosine {c:.4f}" for k, c in m.cosine.items() if not c >= min_cosine]
    if m.top1_agreement is not None and m.top1_agreement < min_agreement:
        bad.append(f"top-1 agreement {100 * m.top1_agreement:.1f}%")
    return "; ".join(bad) or None


# -- plots -----------------------------------------------------------------------------------------------------------

def _safe(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return (keep or "tensor")[:120]


def plot_ranges(plot_dir: str | os.PathLike, collectors: dict, ranges: dict[str, tuple[float, float]],
                weights: list[tuple[str, np.ndarray, np.ndarray, int | None]], method: str) -> int:
    """One PNG per activation (histogram of |x|, log scale, clip marked) and per weight (histogram of the values,
    per-channel clip ranges marked). Returns the number of files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionsError("plot_dir needs matplotlib: pip install 'onnxopt[plot]'") from None
    out = Path(plot_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, (lo, hi) in ranges.items():
        c = collectors.get(name)
        if c is None or c.count == 0 or c.edge == 0:
            continue
        n = min(c.bins, int(math.ceil(c.absmax / c.width)) + 1) if c.width else 1
        edges = np.arange(n + 1) * c.width
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.stairs(np.maximum(c.hist[:n], 0), edges, fill=True, alpha=0.7)
        ax.set_yscale("log")
        t = max(abs(lo), abs(hi))
        ax.axvline(t, color="r", ls="--", label=f"clip {t:.4g} ({method})")
        ax.axvline(c.absmax, color="k", ls=":", label=f"max |x| {c.absmax:.4g}")
        ax.set_xlabel("|x|")
        ax.set_ylabel("count")
        ax.set_title(f"activation {name}: range [{lo:.4g}, {hi:.4g}]", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"act_{_safe(name)}.png", dpi=80)
        plt.close(fig)
        written += 1
    for name, w, scales, axis in weights:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.hist(w.ravel(), bins=201, log=True, alpha=0.7)
        levels = 127
        clip_hi, clip_lo = float(np.max(scales) * levels), float(np.min(scales) * levels)
        ax.axvline(clip_hi, color="r", ls="--", label=f"largest clip ±{clip_hi:.4g}")
        ax.axvline(-clip_hi, color="r", ls="--")
        if axis is not None and scales.size > 1:
            ax.axvline(clip_lo, color="orange", ls=":", label=f"smallest per-channel clip ±{clip_lo:.4g}")
            ax.axvline(-clip_lo, color="orange", ls=":")
        ax.set_title(f"weight {name} ({'per-channel axis %d' % axis if axis is not None else 'per-tensor'}, "
                     f"{scales.size} scale(s))", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"weight_{_safe(name)}.png", dpi=80)
        plt.close(fig)
        written += 1
    return written
