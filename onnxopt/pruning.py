"""Channel pruning on ONNX graphs: dependency groups, importance, selection, channel surgery, value propagation.

Used by the ``prune-channels`` and ``prune-blocks`` passes (recovery by least squares lives in
:mod:`onnxopt.pruning_recover`).

Dependency groups
-----------------
Every tensor whose channel axis we can follow carries a *layout*: one element id per channel position. A Conv /
ConvTranspose / Gemm / MatMul with a constant weight creates fresh elements for its output channels (a *root*). Ops
that keep the channel axis (BatchNormalization, element-wise activations, Pad, pooling, Resize, Dropout/Identity, Clip,
Mul/Add with per-channel constants, reductions over other axes) pass the layout on; Concat concatenates layouts (channel
offsets), Split/Slice on the channel axis cut them, Flatten/Reshape into a Gemm repeat each element over its H*W block
of columns; a depthwise conv maps its output channels onto its input channels. Element-wise ops with several channel
operands (residual Add/Sub/Mul) *unify* the elements position by position (union-find). The resulting equivalence
classes are the prunable units: removing a class removes every position carrying one of its elements, everywhere.
A *group* is a set of classes tied together by a root (all channels of one conv, and everything coupled to them).

Anything we cannot follow (Transpose moving the channel axis, a channel-mixing Reshape, Softmax or a reduction over
channels, a graph output, a non-constant weight, an unknown op) *fixes* the elements it touches, with the reason; a
fixed class is never removed, so the graph inputs and outputs keep their shapes.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import PreconditionError, first_line
from onnxopt.graphutil import const_value, unique_name

# ================================================================================================ small helpers

_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Gelu", "Softplus",
    "Softsign", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Erf", "Floor", "Ceil", "Round", "Sign", "Sin",
    "Cos", "Identity", "Cast", "Mish", "ThresholdedRelu", "Not", "IsNaN", "IsInf", "Dropout", "Clip", "Shrink",
}
_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
}
_POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_REDUCES = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare",
}
_SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax"}


def _key(text: str) -> str:
    """A stats-key fragment: lower case, non-alphanumerics to underscores."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _static(shape: tuple | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def _prod(dims: Iterable) -> int | None:
    out = 1
    for d in dims:
        if not isinstance(d, int) or d < 0:
            return None
        out *= d
    return out


def _attr(node: gs.Node, name: str, default: Any = None) -> Any:
    return node.attrs.get(name, default)


def _is_default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def unary_function(node: gs.Node) -> Callable[[np.ndarray], np.ndarray] | None:
    """A float64 numpy version of an element-wise unary op (for constant/mean propagation); None if not modelled."""
    op = node.op
    if op in ("Identity", "Dropout"):
        return lambda x: x
    if op == "Relu":
        return lambda x: np.maximum(x, 0.0)
    if op == "LeakyRelu":
        a = float(_attr(node, "alpha", 0.01))
        return lambda x: np.where(x >= 0, x, a * x)
    if op == "Sigmoid":
        return lambda x: 1.0 / (1.0 + np.exp(-x))
    if op == "Tanh":
        return np.tanh
    if op == "HardSigmoid":
        a, b = float(_attr(node, "alpha", 0.2)), float(_attr(node, "beta", 0.5))
        return lambda x: np.clip(a * x + b, 0.0, 1.0)
    if op == "HardSwish":
        return lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    if op == "Elu":
        a = float(_attr(node, "alpha", 1.0))
        return lambda x: np.where(x > 0, x, a * (np.exp(np.minimum(x, 0)) - 1.0))
    if op == "Selu":
        a = float(_attr(node, "alpha", 1.67326319217681884765625))
        g = float(_attr(node, "gamma", 1.05070102214813232421875))
        return lambda x: g * np.where(x > 0, x, a * (np.exp(np.minimum(x, 0)) - 1.0))
    if op == "Softplus":
        return lambda x: np.logaddexp(0.0, x)
    if op == "Mish":
        return lambda x: x * np.tanh(np.logaddexp(0.0, x))
    if op == "Gelu":
        if _attr(node, "approximate", "none") == "tanh":
            return lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
        return lambda x: 0.5 * x * (1 + _erf(x / np.sqrt(2.0)))
    if op == "Neg":
        return np.negative
    if op == "Abs":
        return np.abs
    if op == "Exp":
        return np.exp
    if op == "Clip":
        lo, hi = -np.inf, np.inf
        if len(node.inputs) > 1 or "min" not in node.attrs:
            vals = []
            for t in node.inputs[1:3]:
                if t is None or t.name == "":
                    vals.append(None)
                    continue
                v = const_value(t)
                if v is None:
                    return None
                vals.append(float(np.asarray(v).reshape(-1)[0]))
            vals += [None] * (2 - len(vals))
            lo = -np.inf if vals[0] is None else vals[0]
            hi = np.inf if vals[1] is None else vals[1]
        else:
            lo, hi = float(_attr(node, "min", -np.inf)), float(_attr(node, "max", np.inf))
        return lambda x: np.clip(x, lo, hi)
    return None


# ================================================================================================ union-find


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes with edges ``a[i] - b[i]``: each node's label is the smallest node id of
    its component (min-label propagation with pointer jumping; a few numpy passes, no Python loop over nodes)."""
    labels = np.arange(n, dtype=np.int64)
    if n == 0 or len(a) == 0:
        return labels
    while True:
        m = np.minimum(labels[a], labels[b])
        new = labels.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        while True:
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, labels):
            return labels
        labels = new


# ================================================================================================ analysis data


@dataclass
class Layout:
    """The channel positions of one tensor: ``elems[i]`` is the element carried at index ``i`` of axis ``axis``."""

    elems: np.ndarray
    axis: int


@dataclass
class Layer:
    """A weighted op whose weight is sliced by pruning: Conv, ConvTranspose, Gemm or MatMul with a constant weight."""

    node: gs.Node
    kind: str  # conv | convtranspose | gemm | matmul
    weight: np.ndarray
    in_name: str | None  # tracked input tensor (its positions index the weight's input channels), else None
    out_name: str | None  # tracked output tensor, else None
    root: bool  # the output channels are a new channel space
    groups: int = 1
    depthwise: bool = False
    w_in_axis: int = 1  # axis of `weight` indexing input channels (within a group for grouped convs)
    w_out_axis: int = 0
    bias_index: int | None = None  # node input holding the bias, if any
    bn: gs.Node | None = None  # a BatchNormalization consuming the output directly (for importance)
    macs: int = 0  # Conv/Gemm MACs of the original layer (0 when unknown)
    out_channels: int = 0
    in_channels: int = 0
    exact_fold: bool = False  # a constant input channel folds exactly into the bias (no border effects)


@dataclass
class Reason:
    key: str
    detail: str


@dataclass
class Group:
    """Classes (prunable units) tied together by roots. ``name`` is its first root layer."""

    gid: int
    name: str
    classes: np.ndarray  # class ids (union-find roots) in a stable order
    layers: list[str]  # node names of root layers
    fixed: dict[int, Reason]  # class -> why it cannot be removed
    members: list[str] = field(default_factory=list)  # layers producing or consuming the group's channels
    blocks: list[list[np.ndarray]] = field(default_factory=list)  # partitions whose blocks keep equal counts
    nonempty: list[np.ndarray] = field(default_factory=list)  # class sets that must keep >= 1 class

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> bool:
        return len(self.fixed) < len(self.classes)


def _tracked_input_handler(handler: Callable) -> Callable:
    """For a :class:`ChannelGraph` handler that follows the channels of its node's first input: it is called as
    ``handler(self, node, layout_of_that_input, ...)`` only when that input is tracked; otherwise the node's outputs
    are left untracked (:meth:`ChannelGraph.unknown_outputs`)."""

    @functools.wraps(handler)
    def handle(self: ChannelGraph, node: gs.Node, *args: Any, **kwargs: Any) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            self.unknown_outputs(node)
        else:
            handler(self, node, lay, *args, **kwargs)

    return handle


class ChannelGraph:
    """Dependency analysis of a graph's channel axes (see the module docstring).

    ``shapes`` are the inferred shapes of the graph's values (name -> tuple). The graph is not modified.
    """

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple]) -> None:
        self.graph = graph
        self.shapes = shapes
        self._n_elems = 0
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []  # unified elements (same channel everywhere)
        self.layouts: dict[str, Layout] = {}
        self.fixed: dict[int, Reason] = {}
        self.owner: list[str] = []  # owner label per element (root node name or pseudo-root)
        self.layers: list[Layer] = []
        self.layer_by_node: dict[str, Layer] = {}
        self.actions: list[Callable[["Surgery"], None]] = []
        self.flow: list[tuple] = []  # value-propagation program (see ValuePropagation)
        self.block_constraints: list[list[np.ndarray]] = []  # element blocks that must keep equal counts
        self.nonempty: list[np.ndarray] = []  # element sets that must keep at least one element
        self.bns: list[tuple[gs.Node, str]] = []  # (BatchNormalization node, its tracked input)
        self.consumers: dict[str, list[gs.Node]] = defaultdict(list)
        for node in graph.nodes:
            for t in node.inputs:
                if t is not None and t.name:
                    self.consumers[t.name].append(node)
        self._subgraph_names = self._names_used_in_subgraphs(graph)
        for node in graph.nodes:
            self._visit(node)
        for t in graph.outputs:
            lay = self.layouts.get(t.name)
            if lay is not None:
                self.fix(lay.elems, "graph_output", f"{t.name!r} is a graph output (its shape is kept)")
        self._finish()

    # -- primitives -------------------------------------------------------------------------------------------------
    def shape(self, t: gs.Tensor | str | None) -> tuple | None:
        if t is None:
            return None
        name = t if isinstance(t, str) else t.name
        if isinstance(t, gs.Constant):
            return tuple(t.shape)
        s = self.shapes.get(name)
        return tuple(s) if s is not None else None

    def rank(self, t: gs.Tensor | str) -> int | None:
        s = self.shape(t)
        return None if s is None else len(s)

    def lay(self, t: gs.Tensor | None) -> Layout | None:
        if t is None or not t.name or isinstance(t, gs.Constant):
            return None
        return self.layouts.get(t.name)

    def new_elems(self, n: int, owner: str) -> np.ndarray:
        e = np.arange(self._n_elems, self._n_elems + n, dtype=np.int64)
        self._n_elems += n
        self.owner.extend([owner] * n)
        return e

    def fix(self, elems: np.ndarray, key: str, detail: str) -> None:
        for e in np.asarray(elems).ravel().tolist():
            if e not in self.fixed:
                self.fixed[e] = Reason(key, detail)

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        self._pairs.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))

    def set(self, t: gs.Tensor, layout: Layout | None) -> None:
        if layout is not None and t is not None and t.name:
            self.layouts[t.name] = layout

    def opaque(self, node: gs.Node, key: str, detail: str) -> None:
        """``node`` does something we cannot follow: fix every tracked input, leave its outputs untracked."""
        for t in node.inputs:
            lay = self.lay(t)
            if lay is not None:
                self.fix(lay.elems, key, detail)
        self.unknown_outputs(node)

    def unknown_outputs(self, node: gs.Node) -> None:
        """The values of ``node``'s outputs are not followed (value propagation treats them as unknown)."""
        for t in node.outputs:
            self.flow.append(("unknown", t.name))

    @staticmethod
    def _names_used_in_subgraphs(graph: gs.Graph) -> set[str]:
        names: set[str] = set()

        def walk(g: gs.Graph) -> None:
            for n in g.nodes:
                for t in n.inputs:
                    if t is not None:
                        names.add(t.name)
                for v in n.attrs.values():
                    if isinstance(v, gs.Graph):
                        walk(v)

        for n in graph.nodes:
            for v in n.attrs.values():
                if isinstance(v, gs.Graph):
                    walk(v)
        return names

    def _where(self, node: gs.Node) -> str:
        return f"{node.op} {node.name!r}"

    # -- dispatch ---------------------------------------------------------------------------------------------------
    def _visit(self, node: gs.Node) -> None:
        op = node.op
        tracked = [t for t in node.inputs if self.lay(t) is not None]
        if not _is_default_domain(node):
            if tracked:
                self.opaque(node, "unsupported_op", f"{self._where(node)} (domain {node.domain!r}) uses the channels")
            return
        if op == "Constant":
            return
        handler = getattr(self, f"_h_{op}", None)
        if handler is None:
            if op in _UNARY:
                handler = self._h_unary
            elif op in _ELEMENTWISE:
                handler = self._h_elementwise
            elif op in _POOLS:
                handler = self._h_pool
            elif op in _REDUCES:
                handler = self._h_reduce
            elif op in _SOFTMAX:
                handler = self._h_softmax
        if handler is not None:
            handler(node)
        elif tracked:
            self.opaque(node, f"unsupported_{_key(op)}", f"{self._where(node)} uses the channel axis (not supported)")
        else:
            self.unknown_outputs(node)
        for t in node.outputs:
            if t.name in self._subgraph_names and t.name in self.layouts:
                self.fix(self.layouts[t.name].elems, "used_in_subgraph", f"{t.name!r} is read inside a subgraph")

    # -- layers -----------------------------------------------------------------------------------------------------
    def _weight(self, node: gs.Node, i: int) -> np.ndarray | None:
        if len(node.inputs) <= i:
            return None
        return const_value(node.inputs[i])

    def _bn_after(self, out: gs.Tensor) -> gs.Node | None:
        cons = self.consumers.get(out.name, [])
        if len(cons) == 1 and cons[0].op == "BatchNormalization" and cons[0].inputs[0] is out:
            return cons[0]
        return None

    def _conv_pads_zero(self, node: gs.Node) -> bool:
        auto = _attr(node, "auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            return False
        return not any(_attr(node, "pads", []) or [])

    def _h_Conv(self, node: gs.Node) -> None:
        self._conv_like(node, transpose=False)

    def _h_ConvTranspose(self, node: gs.Node) -> None:
        self._conv_like(node, transpose=True)

    def _conv_like(self, node: gs.Node, transpose: bool) -> None:
        x, out = node.inputs[0], node.outputs[0]
        w = self._weight(node, 1)
        lay = self.lay(x)
        where = self._where(node)
        if w is None or (len(node.inputs) > 2 and node.inputs[2].name and const_value(node.inputs[2]) is None):
            self.opaque(node, "non_constant_weight", f"{where} has a non-constant weight or bias")
            return
        if lay is not None and lay.axis != 1:
            self.opaque(node, "channel_axis_mismatch", f"{where} reads channels on axis 1, tracked axis {lay.axis}")
            return
        g = int(_attr(node, "group", 1))
        if transpose:
            c_in, c_out = w.shape[0], w.shape[1] * g
        else:
            c_out, c_in = w.shape[0], w.shape[1] * g
        bias_index = 2 if len(node.inputs) > 2 and node.inputs[2].name else None
        kernel = w.shape[2:]
        if transpose:
            strides = tuple(_attr(node, "strides", [1] * len(kernel)))
            exact = all(k == 1 for k in kernel) and all(s == 1 for s in strides) and self._conv_pads_zero(node)
        else:
            exact = self._conv_pads_zero(node)
        layer = Layer(
            node, "convtranspose" if transpose else "conv", w, None, out.name, True, groups=g,
            w_in_axis=0 if transpose else 1, w_out_axis=1 if transpose else 0, bias_index=bias_index,
            bn=self._bn_after(out), out_channels=c_out, in_channels=c_in, exact_fold=exact,
        )
        depthwise = g > 1 and g == c_in and c_out % c_in == 0
        if depthwise:
            m = c_out // c_in
            layer.depthwise = True
            if lay is None:
                elems = self.new_elems(c_out, node.name)
                self.fix(elems, "depthwise_untracked_input", f"{where} is depthwise over an untracked input")
                layer.root = True
            else:
                layer.in_name = x.name
                layer.root = False
                if m == 1:
                    elems = lay.elems
                else:
                    elems = self.new_elems(c_out, node.name)
                    self.unify(elems, np.repeat(lay.elems, m))
            self.set(out, Layout(elems, 1))
            self._register_layer(layer)
            if transpose:
                self.flow.append(("unknown", out.name))
            else:
                self.flow.append(("dwconv", out.name, x.name if lay is not None else None, layer))
            return
        if g > 1 and transpose:
            self.opaque(node, "grouped_convtranspose", f"{where} is a grouped ConvTranspose (groups={g})")
            return
        if lay is not None:
            layer.in_name = x.name
            if g > 1:
                self.block_constraints.append(list(np.split(lay.elems, g)))
        elems = self.new_elems(c_out, node.name)
        if g > 1:
            self.block_constraints.append(list(np.split(elems, g)))
        self.set(out, Layout(elems, 1))
        self._register_layer(layer)
        self.flow.append(("root", out.name, layer))

    def _register_layer(self, layer: Layer) -> None:
        self.layers.append(layer)
        self.layer_by_node[layer.node.name] = layer

    def _h_Gemm(self, node: gs.Node) -> None:
        a, out = node.inputs[0], node.outputs[0]
        w = self._weight(node, 1)
        where = self._where(node)
        lay = self.lay(a)
        if w is None or w.ndim != 2:
            self.opaque(node, "non_constant_weight", f"{where} has a non-constant weight")
            return
        if int(_attr(node, "transA", 0)):
            self.opaque(node, "gemm_transposed_input", f"{where} has transA=1")
            return
        trans_b = int(_attr(node, "transB", 0))
        n_out = w.shape[0] if trans_b else w.shape[1]
        n_in = w.shape[1] if trans_b else w.shape[0]
        if lay is not None and lay.axis != 1:
            self.opaque(node, "channel_axis_mismatch", f"{where} reads features on axis 1, tracked axis {lay.axis}")
            return
        bias_index = 2 if len(node.inputs) > 2 and node.inputs[2].name else None
        layer = Layer(node, "gemm", w, a.name if lay is not None else None, out.name, True,
                      w_in_axis=1 if trans_b else 0, w_out_axis=0 if trans_b else 1, bias_index=bias_index,
                      bn=self._bn_after(out), out_channels=n_out, in_channels=n_in, exact_fold=True)
        elems = self.new_elems(n_out, node.name)
        if bias_index is not None:
            c = const_value(node.inputs[2])
            if c is None:
                self.fix(elems, "non_constant_bias", f"{where} has a non-constant bias")
            elif c.ndim >= 1 and c.shape[-1] == n_out and n_out > 1:
                pass  # sliced with the output channels by the layer surgery
            elif c.ndim >= 1 and c.shape[-1] not in (1,):
                self.fix(elems, "bias_shape", f"{where}: bias shape {c.shape} not per output feature")
        self.set(out, Layout(elems, 1))
        self._register_layer(layer)
        self.flow.append(("root", out.name, layer))

    def _h_MatMul(self, node: gs.Node) -> None:
        a, out = node.inputs[0], node.outputs[0]
        w = self._weight(node, 1)
        lay = self.lay(a)
        where = self._where(node)
        ra = self.rank(a)
        if w is None or w.ndim != 2 or ra is None:
            if self.lay(node.inputs[1]) is not None or w is None:
                self.opaque(node, "non_constant_weight", f"{where} multiplies by a non-constant matrix")
            else:
                self.opaque(node, "matmul_weight_rank", f"{where} has a weight of rank {w.ndim}")
            return
        if lay is not None and lay.axis != ra - 1:
            if lay.axis == ra - 2 and ra == 1:
                self.opaque(node, "matmul_vector", f"{where} multiplies a vector")
                return
            # the channel axis is a batch/row axis of the product: it passes through unchanged
            self.set(out, lay)
            self.flow.append(("unknown", out.name))
            return
        layer = Layer(node, "matmul", w, a.name if lay is not None else None, out.name, True,
                      w_in_axis=0, w_out_axis=1, bn=self._bn_after(out), out_channels=w.shape[1],
                      in_channels=w.shape[0], exact_fold=False)
        elems = self.new_elems(w.shape[1], node.name)
        self.set(out, Layout(elems, ra - 1))
        self._register_layer(layer)
        self.flow.append(("root", out.name, layer))

    # -- channel-preserving ops ---------------------------------------------------------------------------------------
    def _h_unary(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        others = [t for t in node.inputs[1:] if t is not None and t.name and self.lay(t) is not None]
        if others:
            self.opaque(node, "tracked_parameter", f"{self._where(node)} takes a channel tensor as a parameter")
            return
        if lay is None:
            self.unknown_outputs(node)
            return
        if node.op == "Clip" and len(node.inputs) > 1:
            for t in node.inputs[1:3]:
                if t is not None and t.name and (const_value(t) is None or const_value(t).size != 1):
                    self.opaque(node, "clip_bounds", f"{self._where(node)} has non-scalar or non-constant bounds")
                    return
        for t in node.outputs:
            if t.name:
                self.set(t, lay)
        fn = unary_function(node)
        self.flow.append(("unary", node.outputs[0].name, node.inputs[0].name, fn))
        for t in node.outputs[1:]:
            self.flow.append(("unknown", t.name))

    @_tracked_input_handler
    def _h_BatchNormalization(self, node: gs.Node, lay: Layout) -> None:
        where = self._where(node)
        params = [const_value(t) for t in node.inputs[1:5]]
        if any(p is None for p in params):
            self.opaque(node, "non_constant_weight", f"{where} has non-constant parameters")
            return
        if lay.axis != 1:
            self.opaque(node, "channel_axis_mismatch", f"{where} normalizes axis 1, tracked axis {lay.axis}")
            return
        if len([t for t in node.outputs if t.name]) > 1 or int(_attr(node, "training_mode", 0)):
            self.opaque(node, "bn_training", f"{where} is in training mode")
            return
        self.set(node.outputs[0], lay)
        for i in range(1, 5):
            self._slice_input_action(node, i, node.inputs[0].name, 0)
        gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
        eps = float(_attr(node, "epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        self.flow.append(("bn", node.outputs[0].name, node.inputs[0].name, scale, beta - mean * scale, gamma, beta))
        self.bns.append((node, node.inputs[0].name))

    @_tracked_input_handler
    def _h_InstanceNormalization(self, node: gs.Node, lay: Layout) -> None:
        if lay.axis != 1 or any(const_value(t) is None for t in node.inputs[1:3]):
            self.opaque(node, "instance_norm", f"{self._where(node)}: unsupported parameters or axis")
            return
        self.set(node.outputs[0], lay)
        for i in (1, 2):
            self._slice_input_action(node, i, node.inputs[0].name, 0)
        scale, bias = (np.asarray(const_value(t), dtype=np.float64) for t in node.inputs[1:3])
        self.flow.append(("instnorm", node.outputs[0].name, node.inputs[0].name, scale, bias))

    @_tracked_input_handler
    def _h_LayerNormalization(self, node: gs.Node, lay: Layout) -> None:
        r = self.rank(node.inputs[0])
        axis = int(_attr(node, "axis", -1))
        axis = axis + r if r is not None and axis < 0 else axis
        if r is None or lay.axis >= axis:
            self.opaque(node, "normalization_over_channels", f"{self._where(node)} normalizes over the channel axis")
            return
        self.set(node.outputs[0], lay)
        self.flow.append(("unknown", node.outputs[0].name))

    @_tracked_input_handler
    def _h_pool(self, node: gs.Node, lay: Layout) -> None:
        if lay.axis != 1:
            self.opaque(node, "channel_axis_mismatch", f"{self._where(node)} pools NCHW, tracked axis {lay.axis}")
            return
        if len(node.outputs) > 1 and node.outputs[1].name and self.consumers.get(node.outputs[1].name):
            self.opaque(node, "maxpool_indices", f"{self._where(node)}: its Indices output encodes channel offsets")
            return
        self.set(node.outputs[0], lay)
        out, src = node.outputs[0].name, node.inputs[0].name
        if node.op in ("MaxPool", "GlobalMaxPool", "GlobalAveragePool"):
            self.flow.append(("same", out, src, "max" if "Max" in node.op else "mean"))
        elif node.op == "AveragePool":
            padded = not self._conv_pads_zero(node)
            if padded and int(_attr(node, "count_include_pad", 0)):
                self.flow.append(("zero_only", out, src))
            else:
                self.flow.append(("same", out, src, "mean"))
        else:
            self.flow.append(("unknown", out))

    @_tracked_input_handler
    def _h_Pad(self, node: gs.Node, lay: Layout) -> None:
        x = node.inputs[0]
        where = self._where(node)
        r = self.rank(x)
        if len(node.inputs) > 1 and node.inputs[1].name:
            pads = const_value(node.inputs[1])
            axes = None
            if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name:
                axes = const_value(node.inputs[3])
                if axes is None:
                    self.opaque(node, "non_constant_pads", f"{where} has non-constant axes")
                    return
        else:
            pads, axes = _attr(node, "pads"), None
        if pads is None or r is None:
            self.opaque(node, "non_constant_pads", f"{where} has non-constant pads")
            return
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        axes = list(range(r)) if axes is None else [int(a) + r if int(a) < 0 else int(a) for a in axes]
        n = len(axes)
        for i, a in enumerate(axes):
            if a == lay.axis and (pads[i] != 0 or pads[i + n] != 0):
                self.opaque(node, "pad_on_channels", f"{where} pads the channel axis")
                return
        self.set(node.outputs[0], lay)
        mode = _attr(node, "mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "constant":
            value = 0.0
            if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
                v = const_value(node.inputs[2])
                value = float(np.asarray(v).reshape(-1)[0]) if v is not None and v.size else float("nan")
            elif "value" in node.attrs:
                value = float(_attr(node, "value"))
            self.flow.append(("pad", node.outputs[0].name, x.name, value))
        else:
            self.flow.append(("same", node.outputs[0].name, x.name, "mean"))

    @_tracked_input_handler
    def _h_Resize(self, node: gs.Node, lay: Layout) -> None:
        x, out = node.inputs[0], node.outputs[0]
        where = self._where(node)
        r = self.rank(x)
        scales_t = node.inputs[2] if len(node.inputs) > 2 else (node.inputs[1] if node.op == "Upsample" else None)
        if node.op == "Upsample" and len(node.inputs) == 1:
            scales = _attr(node, "scales")
        else:
            scales = const_value(scales_t) if scales_t is not None and scales_t.name else None
        sizes_t = node.inputs[3] if node.op == "Resize" and len(node.inputs) > 3 else None
        axes = _attr(node, "axes")
        ax = list(range(r)) if axes is None and r is not None else [int(a) + r if a < 0 else int(a) for a in axes or []]
        if sizes_t is not None and sizes_t.name:
            sizes = const_value(sizes_t)
            if sizes is None or lay.axis not in ax:
                self.opaque(node, "resize_sizes", f"{where} has computed sizes")
                return
            idx = ax.index(lay.axis)
            self.actions.append(lambda s, node=node, idx=idx, src=x.name: s.resize_sizes(node, idx, src))
        elif scales is not None and np.asarray(scales).size:
            sc = [float(v) for v in np.asarray(scales).reshape(-1)]
            if lay.axis in ax and sc[ax.index(lay.axis)] != 1.0:
                self.opaque(node, "resize_on_channels", f"{where} scales the channel axis")
                return
        elif scales_t is not None and scales_t.name:
            self.opaque(node, "resize_scales", f"{where} has computed scales")
            return
        self.set(out, lay)
        self.flow.append(("same", out.name, x.name, "mean"))

    _h_Upsample = _h_Resize

    def _h_Shape(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is None:
            return
        r = self.rank(node.inputs[0])
        start = int(_attr(node, "start", 0))
        end = _attr(node, "end")
        if r is not None:
            start = start + r if start < 0 else start
            end = r if end is None else (int(end) + r if int(end) < 0 else int(end))
            if not (start <= lay.axis < end):
                return  # the channel count is not read
            ok = True
            for c in self.consumers.get(node.outputs[0].name, []):
                idx = const_value(c.inputs[1]) if c.op == "Gather" and len(c.inputs) > 1 else None
                if idx is None or int(_attr(c, "axis", 0)) != 0:
                    ok = False
                    break
                idx = [int(i) + (end - start) if int(i) < 0 else int(i) for i in np.asarray(idx).reshape(-1)]
                if lay.axis - start in idx:
                    ok = False
                    break
            if ok:
                return
        self.fix(lay.elems, "shape_read", f"{self._where(node)} reads the channel count")

    def _h_Size(self, node: gs.Node) -> None:
        lay = self.lay(node.inputs[0])
        if lay is not None:
            self.fix(lay.elems, "shape_read", f"{self._where(node)} reads the element count")

    # -- element-wise with several operands -------------------------------------------------------------------------
    def _h_elementwise(self, node: gs.Node) -> None:
        out = node.outputs[0]
        where = self._where(node)
        r = self.rank(out)
        ins = [t for t in node.inputs]
        tracked = [(i, t, self.lay(t)) for i, t in enumerate(ins) if self.lay(t) is not None]
        if not tracked:
            self.flow.append(("unknown", out.name))
            return
        if r is None:
            self.opaque(node, "unknown_shape", f"{where}: output shape unknown")
            return
        axes = {lay.axis + r - self.rank(t) for _, t, lay in tracked}
        if len(axes) != 1:
            self.opaque(node, "channel_axis_mismatch", f"{where} combines operands with different channel axes")
            return
        a = axes.pop()
        out_shape = self.shape(out)
        c_out = out_shape[a] if out_shape is not None and isinstance(out_shape[a], int) else None
        full = [(i, t, lay) for i, t, lay in tracked if c_out is None or len(lay.elems) == c_out]
        if not full:
            self.opaque(node, "broadcast_over_channels", f"{where} broadcasts a tracked tensor over channels")
            return
        c_out = len(full[0][2].elems)
        for i, t, lay in tracked:
            if len(lay.elems) != c_out:
                self.fix(lay.elems, "broadcast_over_channels", f"{where} broadcasts {t.name!r} over the channels")
        operands: list[tuple] = []
        for i, t in enumerate(ins):
            if t is None or not t.name:
                operands.append(("u",))
                continue
            lay = self.lay(t)
            if lay is not None:
                operands.append(("t", t.name) if len(lay.elems) == c_out else ("u",))
                continue
            v = const_value(t)
            s = tuple(v.shape) if v is not None else self.shape(t)
            if s is None:
                self.opaque(node, "unknown_shape", f"{where}: operand {t.name!r} has an unknown shape")
                return
            idx = a - (r - len(s))
            if idx < 0 or s[idx] == 1 or c_out == 1:
                operands.append(("c", v) if v is not None else ("u",))
                continue
            if s[idx] != c_out:
                self.opaque(node, "broadcast_over_channels", f"{where}: operand {t.name!r} does not match channels")
                return
            if v is None:
                for _, _, lay in full:
                    self.fix(lay.elems, "untracked_operand",
                             f"{where} combines the channels with an untracked tensor {t.name!r}")
                operands.append(("u",))
                continue
            self._slice_input_action(node, i, full[0][1].name, idx)
            operands.append(("cc", v, idx))
        base = full[0][2].elems
        for _, _, lay in full[1:]:
            self.unify(base, lay.elems)
        layout = Layout(base, a)
        for t in node.outputs:
            self.set(t, layout)
        self.flow.append(("elementwise", out.name, node.op, operands, a, r))

    # -- layout ops -------------------------------------------------------------------------------------------------
    def _h_Concat(self, node: gs.Node) -> None:
        out = node.outputs[0]
        where = self._where(node)
        ins = [t for t in node.inputs if t is not None and t.name]
        lays = [self.lay(t) for t in ins]
        if all(lay is None for lay in lays):
            self.flow.append(("unknown", out.name))
            return
        r = self.rank(out)
        if r is None:
            self.opaque(node, "unknown_shape", f"{where}: output shape unknown")
            return
        axis = int(_attr(node, "axis", 1))
        axis = axis + r if axis < 0 else axis
        tracked_axes = {lay.axis for lay in lays if lay is not None}
        if len(tracked_axes) != 1:
            self.opaque(node, "channel_axis_mismatch", f"{where} concatenates different channel axes")
            return
        ch = tracked_axes.pop()
        if axis == ch:
            parts, sources = [], []
            for t, lay in zip(ins, lays):
                if lay is not None:
                    parts.append(lay.elems)
                    sources.append((t.name, len(lay.elems)))
                    continue
                s = self.shape(t)
                if s is None or not isinstance(s[axis], int):
                    self.opaque(node, "unknown_shape", f"{where}: operand {t.name!r} has an unknown shape")
                    return
                e = self.new_elems(s[axis], f"{node.name}:{t.name}")
                self.fix(e, "concat_untracked", f"{where} concatenates an untracked tensor {t.name!r}")
                parts.append(e)
                sources.append((None, s[axis]))
            self.set(out, Layout(np.concatenate(parts), ch))
            self.flow.append(("concat", out.name, sources))
            return
        if any(lay is None for lay in lays):
            self.opaque(node, "untracked_operand", f"{where} joins tracked and untracked tensors along axis {axis}")
            return
        base = lays[0].elems
        for lay in lays[1:]:
            if len(lay.elems) != len(base):
                self.opaque(node, "channel_axis_mismatch", f"{where}: channel counts differ")
                return
        for lay in lays[1:]:
            self.unify(base, lay.elems)
        self.set(out, Layout(base, ch))
        self.flow.append(("unknown", out.name))

    def _split_sizes(self, node: gs.Node, total: int) -> list[int] | None:
        n_out = len(node.outputs)
        if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
            v = const_value(node.inputs[1])
            return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]
        if "split" in node.attrs:
            return [int(x) for x in _attr(node, "split")]
        n = int(_attr(node, "num_outputs", n_out))
        chunk = -(-total // n)
        sizes = [chunk] * (n - 1) + [total - chunk * (n - 1)]
        return sizes

    @_tracked_input_handler
    def _h_Split(self, node: gs.Node, lay: Layout) -> None:
        x = node.inputs[0]
        where = self._where(node)
        r = self.rank(x)
        axis = int(_attr(node, "axis", 0))
        axis = axis + r if r is not None and axis < 0 else axis
        if axis != lay.axis:
            for t in node.outputs:
                self.set(t, lay)
                self.flow.append(("same", t.name, x.name, "mean"))
            return
        sizes = self._split_sizes(node, len(lay.elems))
        if sizes is None or sum(sizes) != len(lay.elems) or len(sizes) != len(node.outputs):
            self.opaque(node, "non_constant_split", f"{where} has non-constant or unexpected split sizes")
            return
        start = 0
        for t, n in zip(node.outputs, sizes):
            idx = np.arange(start, start + n)
            self.set(t, Layout(lay.elems[idx], lay.axis))
            self.nonempty.append(lay.elems[idx])
            self.flow.append(("gather", t.name, x.name, idx))
            start += n
        self.actions.append(lambda s, node=node: s.split(node))

    @_tracked_input_handler
    def _h_Slice(self, node: gs.Node, lay: Layout) -> None:
        x, out = node.inputs[0], node.outputs[0]
        where = self._where(node)
        r = self.rank(x)
        if len(node.inputs) > 1:
            vals = [const_value(t) if t is not None and t.name else None for t in node.inputs[1:5]]
            vals += [None] * (4 - len(vals))
            starts, ends, axes, steps = vals
            if axes is None and len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name:
                self.opaque(node, "non_constant_slice", f"{where} has computed axes")
                return
            if starts is None or ends is None:
                if axes is not None and r is not None and lay.axis not in [int(a) % r for a in axes]:
                    self.set(out, lay)
                    self.flow.append(("same", out.name, x.name, "mean"))
                    return
                self.opaque(node, "non_constant_slice", f"{where} has computed starts/ends")
                return
            if steps is None and len(node.inputs) > 4 and node.inputs[4] is not None and node.inputs[4].name:
                self.opaque(node, "non_constant_slice", f"{where} has computed steps")
                return
        else:
            starts, ends, axes, steps = _attr(node, "starts"), _attr(node, "ends"), _attr(node, "axes"), None
        starts = [int(v) for v in np.asarray(starts).reshape(-1)]
        ends = [int(v) for v in np.asarray(ends).reshape(-1)]
        axes = list(range(len(starts))) if axes is None else [int(v) for v in np.asarray(axes).reshape(-1)]
        steps = [1] * len(starts) if steps is None else [int(v) for v in np.asarray(steps).reshape(-1)]
        axes = [a + r if a < 0 else a for a in axes] if r is not None else axes
        if lay.axis not in axes:
            self.set(out, lay)
            self.flow.append(("same", out.name, x.name, "mean"))
            return
        i = axes.index(lay.axis)
        if steps[i] != 1:
            self.opaque(node, "strided_channel_slice", f"{where} slices channels with step {steps[i]}")
            return
        c = len(lay.elems)
        s, e, _ = slice(starts[i], ends[i], 1).indices(c)
        idx = np.arange(s, max(s, e))
        self.set(out, Layout(lay.elems[idx], lay.axis))
        self.nonempty.append(lay.elems[idx])
        self.flow.append(("gather", out.name, x.name, idx))
        self.actions.append(lambda sg, node=node, i=i, s=s, e=max(s, e): sg.slice(node, i, s, e))

    def _reshape_map(self, s_in: tuple | None, s_out: tuple | None, a: int, c: int) -> tuple[int, int] | None:
        """(out axis, repeat) when a reshape keeps channel blocks contiguous, else None.

        The dims before the channel axis must reappear unchanged (or with the same static product) before the output
        axis ``b``; the output dim ``b`` must be the channels times a prefix of the trailing dims (``repeat``), and the
        remaining trailing dims must keep their product. Symbolic leading dims (a dynamic batch) are fine.
        """
        if s_in is None or s_out is None or a >= len(s_in) or s_in[a] != c:
            return None
        if not _static(s_in[a:]):
            return None
        lead = tuple(s_in[:a])
        pre = _prod(lead)
        for b in range(len(s_out)):
            head = tuple(s_out[:b])
            if head != lead and (pre is None or _prod(head) != pre):
                continue
            d = s_out[b]
            if not isinstance(d, int) or d <= 0 or d % c or not _static(s_out[b + 1:]):
                continue
            k = d // c
            tail, j = 1, a + 1
            while tail < k and j < len(s_in):
                tail *= s_in[j]
                j += 1
            if tail == k and _prod(s_out[b + 1:]) == _prod(s_in[a + 1:]) // k:
                return b, k
        return None

    @_tracked_input_handler
    def _reshape_like(self, node: gs.Node, lay: Layout, rewrite_shape: bool) -> None:
        x, out = node.inputs[0], node.outputs[0]
        where = self._where(node)
        s_in, s_out = self.shape(x), self.shape(out)
        m = self._reshape_map(s_in, s_out, lay.axis, len(lay.elems))
        if m is None:
            if s_in is None or s_out is None or not _static(s_in[lay.axis:]) or not any(
                    isinstance(d, int) and d > 0 and d % len(lay.elems) == 0 for d in s_out):
                self.opaque(node, "dynamic_shape", f"{where}: shapes around the channel axis are not static "
                                                   f"({s_in} -> {s_out}); give --input-shape")
            else:
                self.opaque(node, "channel_mixing_reshape", f"{where} mixes the channel axis with others")
            return
        b, k = m
        if rewrite_shape:
            shape_v = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if shape_v is None:
                self.opaque(node, "non_constant_reshape", f"{where} has a computed target shape")
                return
            if int(np.asarray(shape_v).reshape(-1)[b]) > 0:
                self.actions.append(lambda s, node=node, b=b, k=k, src=x.name: s.reshape(node, b, k, src))
        idx = np.repeat(np.arange(len(lay.elems)), k)
        self.set(out, Layout(np.repeat(lay.elems, k), b))
        self.flow.append(("gather", out.name, x.name, idx))

    def _h_Reshape(self, node: gs.Node) -> None:
        self._reshape_like(node, rewrite_shape=True)

    def _h_Flatten(self, node: gs.Node) -> None:
        self._reshape_like(node, rewrite_shape=False)

    def _h_Squeeze(self, node: gs.Node) -> None:
        self._reshape_like(node, rewrite_shape=False)

    _h_Unsqueeze = _h_Squeeze

    @_tracked_input_handler
    def _h_Transpose(self, node: gs.Node, lay: Layout) -> None:
        x, out = node.inputs[0], node.outputs[0]
        r = self.rank(x)
        perm = _attr(node, "perm")
        perm = list(range(r))[::-1] if perm is None and r is not None else perm
        if perm is not None and lay.axis < len(perm) and perm[lay.axis] == lay.axis:
            self.set(out, lay)
            self.flow.append(("same", out.name, x.name, "mean"))
            return
        self.opaque(node, "transpose", f"{self._where(node)} moves the channel axis")

    @_tracked_input_handler
    def _h_softmax(self, node: gs.Node, lay: Layout) -> None:
        x, out = node.inputs[0], node.outputs[0]
        r = self.rank(x)
        opset = self.graph.opset or 13
        axis = int(_attr(node, "axis", -1 if opset >= 13 else 1))
        axis = axis + r if r is not None and axis < 0 else axis
        over = lay.axis == axis if opset >= 13 else lay.axis >= axis
        if r is None or over:
            self.opaque(node, f"{_key(node.op)}_over_channels", f"{self._where(node)} normalizes over the channels")
            return
        self.set(out, lay)
        self.flow.append(("unknown", out.name))

    @_tracked_input_handler
    def _h_reduce(self, node: gs.Node, lay: Layout) -> None:
        x, out = node.inputs[0], node.outputs[0]
        where = self._where(node)
        r = self.rank(x)
        axes = _attr(node, "axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
            axes = const_value(node.inputs[1])
            if axes is None:
                self.opaque(node, "non_constant_axes", f"{where} has computed axes")
                return
        if r is None:
            self.opaque(node, "unknown_shape", f"{where}: input shape unknown")
            return
        if axes is None or np.asarray(axes).size == 0:
            if int(_attr(node, "noop_with_empty_axes", 0)):
                self.set(out, lay)
                self.flow.append(("same", out.name, x.name, "mean"))
                return
            axes = list(range(r))
        axes = sorted({int(a) + r if int(a) < 0 else int(a) for a in np.asarray(axes).reshape(-1)})
        if lay.axis in axes:
            self.opaque(node, "reduction_over_channels", f"{where} reduces over the channel axis")
            return
        keep = int(_attr(node, "keepdims", 1))
        new_axis = lay.axis if keep else lay.axis - sum(1 for a in axes if a < lay.axis)
        self.set(out, Layout(lay.elems, new_axis))
        if node.op in ("ReduceMean", "ReduceMax", "ReduceMin"):
            self.flow.append(("same", out.name, x.name, "max" if node.op != "ReduceMean" else "mean"))
        else:
            self.flow.append(("unknown", out.name))

    def _h_ArgMax(self, node: gs.Node) -> None:
        x, out = node.inputs[0], node.outputs[0]
        lay = self.lay(x)
        if lay is None:
            return
        r = self.rank(x)
        axis = int(_attr(node, "axis", 0))
        axis = axis + r if r is not None and axis < 0 else axis
        if r is None or axis == lay.axis:
            self.opaque(node, "reduction_over_channels", f"{self._where(node)} reduces over the channel axis")
            return
        keep = int(_attr(node, "keepdims", 1))
        self.set(out, Layout(lay.elems, lay.axis if keep or axis > lay.axis else lay.axis - 1))
        self.flow.append(("unknown", out.name))

    _h_ArgMin = _h_ArgMax

    # -- constant slicing -------------------------------------------------------------------------------------------
    def _slice_input_action(self, node: gs.Node, i: int, src: str, axis: int) -> None:
        v = const_value(node.inputs[i]) if len(node.inputs) > i else None
        if v is None or v.ndim == 0:
            return
        if v.shape[axis] == 1:
            return
        self.actions.append(lambda s, node=node, i=i, src=src, axis=axis: s.slice_input(node, i, src, axis))

    # -- groups -----------------------------------------------------------------------------------------------------
    def _finish(self) -> None:
        n = self._n_elems
        pa = np.concatenate([p[0] for p in self._pairs]) if self._pairs else np.zeros(0, dtype=np.int64)
        pb = np.concatenate([p[1] for p in self._pairs]) if self._pairs else np.zeros(0, dtype=np.int64)
        self.class_of = _components(n, pa, pb)  # class id = smallest element id of the class
        # a group: the classes tied together by the elements of one root (one owner)
        owner_ids: dict[str, int] = {}
        first_elem: list[int] = []
        owner_of = np.empty(n, dtype=np.int64)
        for e, owner in enumerate(self.owner):
            oid = owner_ids.get(owner)
            if oid is None:
                oid = owner_ids[owner] = len(first_elem)
                first_elem.append(e)
            owner_of[e] = oid
        firsts = np.array(first_elem, dtype=np.int64)[owner_of] if n else np.zeros(0, dtype=np.int64)
        group_label = _components(n, np.concatenate([pa, np.arange(n)]), np.concatenate([pb, firsts]))
        cls_list = self.class_of.tolist()
        glabel = group_label.tolist()
        group_of_class: dict[int, int] = {}
        members: dict[int, list[int]] = defaultdict(list)
        for c, gl in zip(cls_list, glabel):
            if c not in group_of_class:
                group_of_class[c] = gl
                members[gl].append(c)
        first_of_owner = {owner: cls_list[first_elem[oid]] for owner, oid in owner_ids.items()}
        root_layer_names = {ly.node.name for ly in self.layers if ly.root}
        layers_of: dict[int, list[str]] = defaultdict(list)
        for owner, c in first_of_owner.items():
            if owner in root_layer_names:
                layers_of[group_of_class[c]].append(owner)
        self.groups: list[Group] = []
        self.group_of_class = {}
        for g_root, classes in members.items():
            layer_names = layers_of.get(g_root, [])
            name = layer_names[0] if layer_names else self.owner[classes[0]]  # a class id is an element id
            g = Group(len(self.groups), name, np.array(classes, dtype=np.int64), layer_names, {})
            for c in classes:
                self.group_of_class[c] = g.gid
            self.groups.append(g)
        for e, reason in self.fixed.items():
            c = int(self.class_of[e])
            g = self.groups[self.group_of_class[c]]
            g.fixed.setdefault(c, reason)
        for blocks in self.block_constraints:
            cls = [np.unique(self.class_of[b]) for b in blocks]
            all_cls = np.unique(np.concatenate(cls))
            gids = {self.group_of_class[int(c)] for c in all_cls.tolist()}
            g = self.groups[gids.pop()]
            if gids or len(all_cls) != g.size or sum(len(c) for c in cls) != len(all_cls):
                for gid in gids | {g.gid}:
                    grp = self.groups[gid]
                    for c in grp.classes.tolist():
                        grp.fixed.setdefault(c, Reason("grouped_conv_partial",
                                                       "a grouped conv's groups do not cover whole channel groups"))
                continue
            g.blocks.append(cls)
        for elems in self.nonempty:
            if len(elems):
                cls = np.unique(self.class_of[elems])
                self.groups[self.group_of_class[int(cls[0])]].nonempty.append(cls)
        for ly in self.layers:
            touched: set[int] = set()
            for t in (ly.out_name if (ly.root or ly.depthwise) else None, ly.in_name):
                if t and t in self.layouts:
                    cls = np.unique(self.class_of[self.layouts[t].elems]).tolist()
                    touched.update(self.group_of_class[c] for c in cls)
            for gid in sorted(touched):
                self.groups[gid].members.append(ly.node.name)
        self.n_classes = n
        self._layer_cls: dict[int, tuple] = {}

    # -- queries ----------------------------------------------------------------------------------------------------
    def layer_classes(self, ly: Layer) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Classes of a layer's pruned output positions and of its input positions (None when not pruned there)."""
        key = id(ly)
        if key not in self._layer_cls:
            out_cls = in_cls = None
            if ly.out_name and ly.out_name in self.layouts and (ly.root or ly.depthwise):
                out_cls = self.class_of[self.layouts[ly.out_name].elems]
            if ly.in_name and not ly.depthwise:
                in_cls = self.class_of[self.layouts[ly.in_name].elems]
            self._layer_cls[key] = (out_cls, in_cls)
        return self._layer_cls[key]

    def classes_of(self, name: str) -> np.ndarray | None:
        lay = self.layouts.get(name)
        return None if lay is None else self.class_of[lay.elems]

    def group_reasons(self, g: Group) -> Counter:
        return Counter(r.key for r in g.fixed.values())


# ================================================================================================ importance


def class_importance(cg: ChannelGraph, criterion: str, seed: int = 0) -> tuple[np.ndarray, dict[str, int]]:
    """Importance per class (indexed by class id), aggregated over the coupled layers of its group.

    ``l1``/``l2``: the L1 norm (or squared L2 norm) of every weight slice a class owns: the producing filters (scaled by
    the following BatchNormalization's gamma/sqrt(var+eps) when there is one, so that the norm is that of the folded
    filter), the consuming layers' input slices (a Gemm's H*W block of columns after a Flatten), depthwise filters.
    Each layer's slice norms are divided by that layer's mean slice norm, so layers of different scale count equally,
    then summed per class. ``bn-gamma``: |gamma| of the BatchNormalizations on the class's channels (network slimming);
    groups without a BatchNormalization fall back to ``l1``. ``random``: uniform random numbers (a baseline).
    """
    n = cg.n_classes
    stats: dict[str, int] = {}
    if criterion == "random":
        return np.random.default_rng(seed).random(n), stats
    power = 2 if criterion == "l2" else 1
    weight_imp = np.zeros(n)

    def add(classes: np.ndarray | None, values: np.ndarray, target: np.ndarray) -> None:
        if classes is None or len(values) == 0:
            return
        m = float(np.mean(values))
        if not np.isfinite(m) or m <= 0:
            return
        np.add.at(target, classes, values / m)

    for ly in cg.layers:
        w = np.asarray(ly.weight)
        wp = np.abs(w) if power == 1 else np.square(w)
        out_classes = cg.classes_of(ly.out_name) if ly.out_name else None
        if ly.depthwise:
            per = wp.reshape(wp.shape[0], -1).sum(axis=1).astype(np.float64)
            add(out_classes if ly.kind == "conv" else cg.classes_of(ly.in_name) if ly.in_name else None, per,
                weight_imp)
            continue
        if ly.root and out_classes is not None:
            axes = tuple(i for i in range(w.ndim) if i != ly.w_out_axis)
            per = wp.sum(axis=axes).astype(np.float64)
            if ly.bn is not None:
                g, _, _, var = (np.asarray(const_value(t), dtype=np.float64) for t in ly.bn.inputs[1:5])
                scale = np.abs(g) / np.sqrt(var + float(_attr(ly.bn, "epsilon", 1e-5)))
                per = per * (scale if power == 1 else scale**2)
            add(out_classes, per, weight_imp)
        if ly.in_name is not None:
            in_classes = cg.classes_of(ly.in_name)
            axes = tuple(i for i in range(w.ndim) if i != ly.w_in_axis)
            if ly.groups > 1:  # input position p = group * (C_in / groups) + index within the group
                out_per_group = w.shape[0] // ly.groups
                per = np.concatenate([
                    wp[gi * out_per_group:(gi + 1) * out_per_group].sum(
                        axis=tuple(i for i in range(w.ndim) if i != 1)).astype(np.float64)
                    for gi in range(ly.groups)
                ])
            else:
                per = wp.sum(axis=axes).astype(np.float64)
            add(in_classes, per, weight_imp)
    if criterion in ("l1", "l2"):
        return weight_imp, stats
    # bn-gamma
    bn_imp = np.zeros(n)
    has_bn = np.zeros(n, dtype=bool)
    for bn, src in cg.bns:
        classes = cg.classes_of(src)
        gamma = np.abs(np.asarray(const_value(bn.inputs[1]), dtype=np.float64))
        add(classes, gamma, bn_imp)
        has_bn[classes] = True
    out = np.zeros(n)
    fallback = 0
    for g in cg.groups:
        if has_bn[g.classes].any():
            out[g.classes] = bn_imp[g.classes]
        else:
            out[g.classes] = weight_imp[g.classes]
            if g.prunable:
                fallback += 1
    if fallback:
        stats["bn_gamma_fallback_l1"] = fallback
    return out, stats


# ================================================================================================ selection


@dataclass
class Selection:
    keep: np.ndarray  # bool per class id
    group_ratio: dict[int, float]  # requested ratio per group (for stats)
    notes: Counter


def _round_keep(n: int, n_fixed: int, want: float, round_to: int, min_channels: int) -> int:
    """Kept count for a group of ``n`` classes: ``want`` rounded to a multiple of ``round_to``, within bounds."""
    r = max(1, round_to)
    k = int(round(want / r)) * r
    k = max(k, r, min_channels, n_fixed)
    if k % r:
        k = -(-k // r) * r
    return min(k, n)


class _GroupSelector:
    """Keeps the fixed classes of a group, then the most important ones, honouring block and nonempty constraints.
    Orders are computed once, so that :meth:`keep` is cheap (the target_macs search calls it many times)."""

    def __init__(self, g: Group, imp: np.ndarray) -> None:
        self.g = g
        classes = g.classes
        self.fixed = np.array([c in g.fixed for c in classes.tolist()], dtype=bool)
        pos = {int(c): i for i, c in enumerate(classes.tolist())}
        score = imp[classes]
        self.blocks: list[tuple[np.ndarray, int]] = []  # (free positions by importance, fixed count) per block
        if g.blocks:
            for blk in g.blocks[0]:
                idx = np.array([pos[int(c)] for c in blk.tolist()])
                order = idx[np.argsort(-score[idx], kind="stable")]
                self.blocks.append((order[~self.fixed[order]], int(self.fixed[idx].sum())))
        order = np.argsort(-score, kind="stable")
        self.free_order = order[~self.fixed[order]]
        self.n_fixed = int(self.fixed.sum())
        self.nonempty = []
        for cls in g.nonempty:
            idx = np.array([pos[int(c)] for c in cls.tolist()])
            self.nonempty.append((idx, idx[np.argmax(score[idx])]))

    def keep(self, k_keep: int) -> np.ndarray:
        keep = self.fixed.copy()
        if self.blocks:
            per = max(1, -(-k_keep // len(self.blocks)))
            for free, n_fixed in self.blocks:
                keep[free[: max(0, per - n_fixed)]] = True
            return keep
        keep[self.free_order[: max(0, k_keep - self.n_fixed)]] = True
        for idx, best in self.nonempty:
            if not keep[idx].any():
                keep[best] = True
        return keep


def _select_in_group(g: Group, imp: np.ndarray, k_keep: int) -> np.ndarray:
    """Classes of ``g`` to keep (bool over ``g.classes``): fixed ones, then the ``k_keep`` most important in total."""
    return _GroupSelector(g, imp).keep(k_keep)


def _blocks_consistent(g: Group) -> bool:
    """Several grouped convs in one group are supported when they split its classes into the same blocks."""
    if len(g.blocks) <= 1:
        return True
    first = [set(b.tolist()) for b in g.blocks[0]]
    for part in g.blocks[1:]:
        if [set(b.tolist()) for b in part] != first:
            return False
    return True


# ================================================================================================ surgery


class Surgery:
    """Applies a class selection to the graph: slices weights and per-channel constants, fixes the parameters of
    Split/Slice/Reshape/Resize, adds folded constant contributions to biases."""

    def __init__(self, graph: gs.Graph, cg: ChannelGraph, keep_class: np.ndarray) -> None:
        self.graph = graph
        self.cg = cg
        self.keep_class = keep_class
        self._taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
        self._cache: dict[tuple, gs.Constant] = {}
        self._alive: list[gs.Tensor] = []
        self.bias_delta: dict[str, np.ndarray] = {}  # layer node name -> delta over ORIGINAL output channels

    def mask(self, name: str) -> np.ndarray:
        return self.keep_class[self.cg.class_of[self.cg.layouts[name].elems]]

    def replace_input(self, node: gs.Node, i: int, values: np.ndarray, key: tuple | None = None) -> None:
        """Give ``node`` a new constant as input ``i`` (never edits the old array; shared results are reused)."""
        if key is not None and key in self._cache:
            node.inputs[i] = self._cache[key]
            return
        old = node.inputs[i]
        sole_user = isinstance(old, gs.Constant) and len(old.outputs) == 1
        name = old.name if sole_user and old.name else unique_name(self.graph, f"{old.name or node.name}_pruned",
                                                                    self._taken)
        const = gs.Constant(name, np.ascontiguousarray(values))
        node.inputs[i] = const
        if key is not None:
            self._cache[key] = const
            self._alive.append(old)  # keep the source alive: its id is part of the key

    def slice_input(self, node: gs.Node, i: int, src: str, axis: int) -> None:
        m = self.mask(src)
        if m.all():
            return
        src_t = node.inputs[i]
        v = const_value(src_t)
        # the key holds the (live) source tensor object, so identical slices of one constant are shared
        self.replace_input(node, i, np.compress(m, v, axis=axis), key=(id(src_t), axis, m.tobytes()))

    def split(self, node: gs.Node) -> None:
        sizes = [int(self.mask(t.name).sum()) for t in node.outputs]
        total = [len(self.cg.layouts[t.name].elems) for t in node.outputs]
        if sizes == total and (len(node.inputs) > 1 or "split" in node.attrs):
            return
        if self.graph.opset is not None and self.graph.opset >= 13:
            arr = np.array(sizes, dtype=np.int64)
            if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
                self.replace_input(node, 1, arr)
            else:
                name = unique_name(self.graph, f"{node.name}_split", self._taken)
                node.inputs = [node.inputs[0], gs.Constant(name, arr)]
            node.attrs.pop("num_outputs", None)
        else:
            node.attrs["split"] = sizes

    def slice(self, node: gs.Node, i: int, s: int, e: int) -> None:
        src = node.inputs[0].name
        m = self.mask(src)
        if m.all():
            return
        new_s = int(m[:s].sum())
        new_e = new_s + int(m[s:e].sum())
        if len(node.inputs) > 1:
            for j, val in ((1, new_s), (2, new_e)):
                v = np.array(const_value(node.inputs[j]), copy=True)
                v.reshape(-1)[i] = val
                self.replace_input(node, j, v)
        else:
            starts, ends = list(_attr(node, "starts")), list(_attr(node, "ends"))
            starts[i], ends[i] = new_s, new_e
            node.attrs["starts"], node.attrs["ends"] = starts, ends

    def reshape(self, node: gs.Node, b: int, k: int, src: str) -> None:
        m = self.mask(src)
        if m.all():
            return
        v = np.array(const_value(node.inputs[1]), copy=True)
        v.reshape(-1)[b] = int(m.sum()) * k
        self.replace_input(node, 1, v)

    def resize_sizes(self, node: gs.Node, idx: int, src: str) -> None:
        m = self.mask(src)
        if m.all():
            return
        v = np.array(const_value(node.inputs[3]), copy=True)
        v.reshape(-1)[idx] = int(m.sum())
        self.replace_input(node, 3, v)

    # -- layers -----------------------------------------------------------------------------------------------------
    def layer(self, ly: Layer) -> bool:
        """Slice one layer's weight and bias (and fold ``bias_delta``); True if anything changed."""
        node = ly.node
        w = ly.weight
        out_m = self.mask(ly.out_name) if ly.out_name and ly.out_name in self.cg.layouts else None
        in_m = self.mask(ly.in_name) if ly.in_name else None
        delta = self.bias_delta.get(node.name)
        changed_w = False
        new_w = w
        if ly.depthwise:
            # conv: weight [C_out, 1, ...] follows the output channels; convtranspose: [C_in, m, ...] the inputs
            m = out_m if ly.kind == "conv" else in_m
            if m is not None and not m.all():
                new_w = np.compress(m, w, axis=0)
                node.attrs["group"] = int(in_m.sum()) if in_m is not None else int(m.sum())
                changed_w = True
        else:
            cut_out = ly.root and out_m is not None and not out_m.all()
            cut_in = in_m is not None and not in_m.all()
            if cut_out and cut_in and ly.groups == 1 and w.ndim >= 2:
                idx: list = [slice(None)] * w.ndim
                o_idx, i_idx = np.flatnonzero(out_m), np.flatnonzero(in_m)
                first_out = ly.w_out_axis < ly.w_in_axis  # the first advanced index gets the column shape
                idx[ly.w_out_axis] = o_idx[:, None] if first_out else o_idx
                idx[ly.w_in_axis] = i_idx if first_out else i_idx[:, None]
                new_w = w[tuple(idx)]
                cut_in = False
                changed_w = True
            elif cut_out:
                new_w = np.compress(out_m, new_w, axis=ly.w_out_axis)
                changed_w = True
            if cut_in:
                if ly.groups > 1:
                    g = ly.groups
                    out_keep = out_m if out_m is not None else np.ones(w.shape[0], dtype=bool)
                    in_blocks = np.split(in_m, g)
                    out_blocks = np.split(out_keep, g)
                    w_blocks = np.split(w, g, axis=0)
                    parts = [np.compress(ib, np.compress(ob, wb, axis=0), axis=1)
                             for ib, ob, wb in zip(in_blocks, out_blocks, w_blocks)]
                    new_w = np.concatenate(parts, axis=0)
                else:
                    new_w = np.compress(in_m, new_w, axis=ly.w_in_axis)
                changed_w = True
        if changed_w:
            self.replace_input(node, 1, new_w)
        # bias: slice by the output mask, then add the folded delta (kept outputs only)
        keep_out = out_m if (out_m is not None and (ly.root or ly.depthwise)) else None
        if ly.bias_index is not None:
            b = np.asarray(const_value(node.inputs[ly.bias_index]))
            new_b = b
            if delta is not None:
                new_b = (b.astype(np.float64) + delta).astype(b.dtype)
            if keep_out is not None and not keep_out.all() and new_b.ndim >= 1 and new_b.shape[-1] == len(keep_out):
                new_b = np.compress(keep_out, new_b, axis=new_b.ndim - 1)
            if new_b is not b:
                self.replace_input(node, ly.bias_index, new_b)
                changed_w = True
        elif delta is not None and np.any(delta != 0):
            b = delta.astype(w.dtype)
            if keep_out is not None and not keep_out.all():
                b = b[keep_out]
            name = unique_name(self.graph, f"{node.name}_bias", self._taken)
            while len(node.inputs) < 2:
                node.inputs.append(gs.Variable.empty())
            node.inputs.append(gs.Constant(name, np.ascontiguousarray(b)))
            changed_w = True
        return changed_w


# ================================================================================================ value propagation


def _depthwise_terms(layer: Layer) -> tuple[np.ndarray, int, np.ndarray]:
    """A depthwise layer's weight as [out channels, taps] (float64), its channel multiplier, and its bias (zeros when
    it has none)."""
    c = layer.out_channels
    w = np.asarray(layer.weight, dtype=np.float64).reshape(c, -1)
    bias = np.zeros(c)
    if layer.bias_index is not None:
        bias = np.asarray(const_value(layer.node.inputs[layer.bias_index]), dtype=np.float64).reshape(-1)
    return w, c // max(1, layer.in_channels), bias


class _ConstAlgebra:
    """Values are exact constants per channel position (NaN = not a known constant)."""

    def unknown(self, n: int) -> np.ndarray:
        return np.full(n, np.nan)

    def root(self, layer: Layer, tol: float) -> np.ndarray:
        w = np.asarray(layer.weight, dtype=np.float64)
        axes = tuple(i for i in range(w.ndim) if i != layer.w_out_axis)
        dead = np.max(np.abs(w), axis=axes) <= tol if w.size else np.ones(layer.out_channels, dtype=bool)
        bias = np.zeros(layer.out_channels)
        if layer.bias_index is not None:
            b = np.asarray(const_value(layer.node.inputs[layer.bias_index]), dtype=np.float64)
            if b.ndim >= 1 and b.shape[-1] == layer.out_channels and b.size == layer.out_channels:
                bias = b.reshape(-1)
            elif b.size == 1:
                bias = np.full(layer.out_channels, float(b.reshape(-1)[0]))
            else:
                return self.unknown(layer.out_channels)
        return np.where(dead, bias, np.nan)

    def unary(self, fn, x):
        if fn is None:
            return self.unknown(len(x))
        with np.errstate(all="ignore"):
            return fn(x)

    def bn(self, x, scale, shift, gamma, beta):
        out = x * scale + shift
        return np.where(gamma == 0, beta, out)

    def instnorm(self, x, scale, bias):
        # a spatially constant channel normalizes to zero: the output is the bias
        return np.where(np.isfinite(x), bias, np.nan)

    def pad(self, x, value):
        return np.where(x == value, x, np.nan)

    def zero_only(self, x):
        return np.where(x == 0, 0.0, np.nan)

    def same(self, x, how):
        return x

    def dwconv(self, x, layer: Layer, tol: float):
        w, m, bias = _depthwise_terms(layer)
        c = layer.out_channels
        wsum = w.sum(axis=1)
        dead = np.max(np.abs(w), axis=1) <= tol
        xin = np.repeat(x, m) if x is not None else np.full(c, np.nan)
        ok = layer.exact_fold | (xin == 0)
        out = np.where(ok, xin * wsum + bias, np.nan)
        return np.where(dead, bias, out)

    def elementwise(self, op, vals):
        with np.errstate(all="ignore"):
            if op in ("Add", "Sum"):
                return sum(vals[1:], vals[0])
            if op == "Sub":
                return vals[0] - vals[1]
            if op == "Mul":
                out = vals[0]
                for v in vals[1:]:
                    out = np.where((out == 0) | (v == 0), 0.0, out * v)
                return out
            if op == "Div":
                return vals[0] / vals[1]
            if op == "Max":
                return np.maximum.reduce(vals)
            if op == "Min":
                return np.minimum.reduce(vals)
            if op == "Mean":
                return sum(vals[1:], vals[0]) / len(vals)
            if op == "PRelu":
                return np.where(vals[0] >= 0, vals[0], vals[0] * vals[1])
            if op == "Pow":
                return np.power(vals[0], vals[1])
        return np.full_like(vals[0], np.nan)


_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(24)
_GH_W = _GH_W / _GH_W.sum()


class _GaussAlgebra:
    """Values are per-position Gaussians (mean, variance); BatchNormalization outputs are N(beta, gamma^2)."""

    def unknown(self, n: int):
        return (np.full(n, np.nan), np.full(n, np.nan))

    def root(self, layer: Layer, tol: float):
        c = _ConstAlgebra().root(layer, tol)
        return (c, np.where(np.isnan(c), np.nan, 0.0))

    def unary(self, fn, x):
        mu, var = x
        if fn is None:
            return self.unknown(len(mu))
        sd = np.sqrt(np.maximum(var, 0.0))
        pts = mu[:, None] + sd[:, None] * _GH_X[None, :]
        with np.errstate(all="ignore"):
            f = fn(pts)
        m = f @ _GH_W
        v = (f * f) @ _GH_W - m * m
        return (m, np.maximum(v, 0.0))

    def bn(self, x, scale, shift, gamma, beta):
        return (np.array(beta, dtype=np.float64), np.array(gamma, dtype=np.float64) ** 2)

    def instnorm(self, x, scale, bias):
        # per sample and channel the output has mean `bias` and variance `scale^2`, whatever the input
        return (np.array(bias, dtype=np.float64), np.array(scale, dtype=np.float64) ** 2)

    def pad(self, x, value):
        return x

    def zero_only(self, x):
        return x

    def same(self, x, how):
        if how == "max":
            return self.unknown(len(x[0]))
        return x

    def dwconv(self, x, layer: Layer, tol: float):
        w, m, bias = _depthwise_terms(layer)
        c = layer.out_channels
        wsum = w.sum(axis=1)
        if x is None:
            return self.unknown(c)
        mu = np.repeat(x[0], m)
        return (mu * wsum + bias, np.full(c, np.nan))

    def elementwise(self, op, vals):
        mus = [v[0] for v in vals]
        vars_ = [v[1] for v in vals]
        if op in ("Add", "Sum"):
            return (sum(mus[1:], mus[0]), sum(vars_[1:], vars_[0]))
        if op == "Sub":
            return (mus[0] - mus[1], vars_[0] + vars_[1])
        if op == "Mul" and len(vals) == 2:
            (m1, v1), (m2, v2) = vals
            return (m1 * m2, v1 * v2 + v1 * m2**2 + v2 * m1**2)
        if op == "Div" and len(vals) == 2:
            (m1, v1), (m2, v2) = vals
            const = v2 == 0
            return (np.where(const, m1 / m2, np.nan), np.where(const, v1 / m2**2, np.nan))
        return self.unknown(len(mus[0]))

    def const(self, v: np.ndarray):
        return (v, np.zeros_like(v))


class ValuePropagation:
    """Per channel position of every tracked tensor: a known constant (``exact``) or a Gaussian (``gauss``)."""

    def __init__(self, cg: ChannelGraph, mode: str, tol: float = 0.0) -> None:
        self.cg = cg
        self.alg = _ConstAlgebra() if mode == "exact" else _GaussAlgebra()
        self.gauss = mode != "exact"
        self.tol = tol
        self.vals: dict[str, Any] = {}
        for step in cg.flow:
            self._step(step)

    def _n(self, name: str) -> int | None:
        lay = self.cg.layouts.get(name)
        return None if lay is None else len(lay.elems)

    def _get(self, name: str | None, n: int):
        if name is not None and name in self.vals:
            return self.vals[name]
        return self.alg.unknown(n)

    def _take(self, v, idx):
        return (v[0][idx], v[1][idx]) if self.gauss else v[idx]

    def _cat(self, parts):
        if self.gauss:
            return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return np.concatenate(parts)

    def _step(self, step: tuple) -> None:
        kind, out = step[0], step[1]
        n = self._n(out)
        if n is None:
            return
        alg = self.alg
        if kind == "unknown":
            self.vals[out] = alg.unknown(n)
        elif kind == "root":
            self.vals[out] = alg.root(step[2], self.tol)
        elif kind == "unary":
            self.vals[out] = alg.unary(step[3], self._get(step[2], n))
        elif kind == "bn":
            _, _, src, scale, shift, gamma, beta = step
            self.vals[out] = alg.bn(self._get(src, n), scale, shift, gamma, beta)
        elif kind == "pad":
            self.vals[out] = alg.pad(self._get(step[2], n), step[3])
        elif kind == "instnorm":
            self.vals[out] = alg.instnorm(self._get(step[2], n), step[3], step[4])
        elif kind == "zero_only":
            self.vals[out] = alg.zero_only(self._get(step[2], n))
        elif kind == "same":
            self.vals[out] = alg.same(self._get(step[2], n), step[3])
        elif kind == "dwconv":
            src = step[2]
            x = self.vals.get(src) if src is not None else None
            self.vals[out] = alg.dwconv(x, step[3], self.tol)
        elif kind == "gather":
            src, idx = step[2], step[3]
            self.vals[out] = self._take(self._get(src, self._n(src) or 0), idx)
        elif kind == "concat":
            parts = []
            for src, cnt in step[2]:
                parts.append(self._get(src, cnt) if src is not None else alg.unknown(cnt))
            self.vals[out] = self._cat(parts)
        elif kind == "elementwise":
            _, _, op, operands, axis, rank = step
            vals = []
            for od in operands:
                if od[0] == "t":
                    vals.append(self._get(od[1], n))
                elif od[0] in ("c", "cc"):
                    v = np.asarray(od[1], dtype=np.float64)
                    if od[0] == "cc":
                        idx = od[2]
                        other = [d for d in range(v.ndim) if d != idx]
                        if any(v.shape[d] != 1 for d in other):
                            vals.append(alg.unknown(n))
                            continue
                        per = v.reshape(-1)
                    else:
                        if v.size != 1:
                            vals.append(alg.unknown(n))
                            continue
                        per = np.full(n, float(v.reshape(-1)[0]))
                    vals.append(alg.const(per) if self.gauss else per)
                else:
                    vals.append(alg.unknown(n))
            self.vals[out] = alg.elementwise(op, vals)
        else:
            self.vals[out] = alg.unknown(n)

    def mean(self, name: str) -> np.ndarray:
        v = self.vals.get(name)
        if v is None:
            return np.full(self._n(name) or 0, np.nan)
        return v[0] if self.gauss else v


def fold_deltas(cg: ChannelGraph, vp: ValuePropagation, keep_class: np.ndarray
                ) -> tuple[dict[str, np.ndarray], Counter]:
    """Bias deltas that fold the removed input channels' (constant or mean) contributions into each consumer.

    With exact constants (:class:`ValuePropagation` mode "exact") the fold is exact where :func:`dead_classes` allowed
    the removal (a Conv without padding or a zero constant, a Gemm); with Gaussian means it is the data-free mean-shift
    correction (border effects of padding ignored). Returns
    ``{layer node name: delta over the layer's original output channels}`` and counters for stats.
    """
    deltas: dict[str, np.ndarray] = {}
    notes: Counter = Counter()
    for ly in cg.layers:
        if ly.in_name is None or ly.depthwise:
            continue
        m = keep_class[cg.class_of[cg.layouts[ly.in_name].elems]]
        removed = np.flatnonzero(~m)
        if not len(removed):
            continue
        mu = vp.mean(ly.in_name)[removed]
        finite = np.isfinite(mu)
        notes["fold_unknown"] += int((~finite).sum())
        notes["fold_zero"] += int((finite & (mu == 0)).sum())
        known = finite & (mu != 0)
        if not known.any():
            continue
        if ly.kind == "matmul" or (ly.bias_index is not None and const_value(ly.node.inputs[ly.bias_index]) is None):
            notes["fold_no_bias"] += int(known.sum())
            continue
        w = np.asarray(ly.weight, dtype=np.float64)
        idx = removed[known]
        vals = mu[known]
        if ly.kind == "conv":
            if ly.groups > 1:
                cin_g = w.shape[1]
                out_g = w.shape[0] // ly.groups
                delta = np.zeros(w.shape[0])
                for p, v in zip(idx.tolist(), vals.tolist()):
                    gi, local = divmod(p, cin_g)
                    rows = slice(gi * out_g, (gi + 1) * out_g)
                    delta[rows] += v * w[rows, local].reshape(out_g, -1).sum(1)
            else:
                taps = w[:, idx].reshape(w.shape[0], len(idx), -1).sum(axis=2)
                delta = taps @ vals
        elif ly.kind == "convtranspose":
            strides = _attr(ly.node, "strides", [1] * (w.ndim - 2))
            taps = w[idx].reshape(len(idx), w.shape[1], -1).sum(axis=2) / float(np.prod(strides))
            delta = vals @ taps
        else:  # gemm
            cols = np.take(w, idx, axis=ly.w_in_axis)
            delta = (cols @ vals) if ly.w_in_axis == 1 else (vals @ cols)
        deltas[ly.node.name] = delta
        notes["folded_channels"] += int(len(idx))
    return deltas, +notes


def dead_classes(cg: ChannelGraph, vp: ValuePropagation) -> tuple[np.ndarray, Counter, list[str]]:
    """Classes that can be removed exactly: every consumer sees a known constant there and can fold it exactly.

    Returns (removable bool per class, counters, explanations for dead channels that have to stay).
    """
    n = cg.n_classes
    known_everywhere = np.ones(n, dtype=bool)
    is_dead = np.zeros(n, dtype=bool)
    notes: Counter = Counter()
    kept_why: list[str] = []
    for name, lay in cg.layouts.items():
        v = vp.mean(name)
        cls = cg.class_of[lay.elems]
        const = np.isfinite(v)
        is_dead[cls[const]] = True
    for ly in cg.layers:
        if ly.in_name is None or ly.depthwise:
            continue
        v = vp.mean(ly.in_name)
        cls = cg.class_of[cg.layouts[ly.in_name].elems]
        unknown = ~np.isfinite(v)
        known_everywhere[cls[unknown]] = False
        if ly.kind == "gemm":
            ok_nonzero = ly.bias_index is None or const_value(ly.node.inputs[ly.bias_index]) is not None
        else:
            ok_nonzero = ly.exact_fold and ly.kind in ("conv", "convtranspose")
        if not ok_nonzero:
            bad = np.isfinite(v) & (v != 0)
            if bad.any():
                known_everywhere[cls[bad]] = False
                for c in np.unique(cls[bad])[:3].tolist():
                    kept_why.append(f"channel class {c}: constant {float(v[cls == c][0]):.4g} feeds "
                                    f"{ly.node.op} {ly.node.name!r} whose padding makes it non-uniform")
                notes["dead_kept_padded_consumer"] += int(len(np.unique(cls[bad])))
    fixed = np.zeros(n, dtype=bool)
    for e in cg.fixed:
        fixed[cg.class_of[e]] = True
    # only the classes that are constant somewhere (dead) and foldable everywhere
    present = np.zeros(n, dtype=bool)
    present[cg.class_of] = True
    removable = present & is_dead & known_everywhere & ~fixed
    # classes constant at every position but whose positions reach no consumer are removable too (covered above)
    return removable, notes, kept_why


def equalize_blocks(cg: ChannelGraph, removable: np.ndarray) -> tuple[np.ndarray, int]:
    """Grouped convs need the same number of channels per group: in groups with a block structure, remove only as
    many dead classes per block as the block with the fewest has. Returns (removable, number of dead classes kept)."""
    out = removable.copy()
    kept = 0
    for g in cg.groups:
        if not g.blocks or not out[g.classes].any():
            continue
        if not _blocks_consistent(g):
            kept += int(out[g.classes].sum())
            out[g.classes] = False
            continue
        per_block = [blk[out[blk]] for blk in g.blocks[0]]
        m = min(len(b) for b in per_block)
        for b in per_block:
            out[b[m:]] = False
            kept += len(b) - m
    return out, kept


# ================================================================================================ shapes


def graph_shapes(graph: gs.Graph, template: onnx.ModelProto | None = None,
                 skeleton: onnx.ModelProto | None = None) -> dict[str, tuple]:
    """Inferred shapes of every value of ``graph`` (on its weight-stubbed ``skeleton``; the graph is not changed)."""
    from onnxopt.model import graph_skeleton
    from onnxopt.shapes import infer_shapes, value_shapes

    skel = skeleton if skeleton is not None else graph_skeleton(graph, template)
    try:
        inferred = infer_shapes(skel, strict=False)
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        raise PreconditionError(f"shape inference fails on the input: {first_line(e)}") from e
    shapes = value_shapes(inferred)
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Constant):
            shapes[name] = tuple(t.shape)
    return shapes


def reinfer_shapes(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Clear every intermediate value's shape and set it again from shape inference (graph inputs/outputs kept).
    Returns the weight-stubbed skeleton it inferred (for MAC analysis of the result)."""
    from onnxopt.model import graph_skeleton
    from onnxopt.shapes import infer_shapes

    io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and name not in io:
            t.shape = None
    skeleton = graph_skeleton(graph, template)
    inferred = infer_shapes(skeleton, strict=False)
    known = {}
    for vi in inferred.graph.value_info:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            known[vi.name] = (
                [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim],
                onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None,
            )
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and name not in io and name in known:
            t.shape = known[name][0]
            if known[name][1] is not None:
                t.dtype = known[name][1]
    return skeleton


# ================================================================================================ MACs


def original_layer_macs(cg: ChannelGraph, analysis: Any) -> None:
    """Fill ``Layer.macs`` from the MAC analysis (:func:`onnxopt.analysis.analyze`) of the unpruned graph."""
    for ly in cg.layers:
        st = analysis.by_name.get(ly.node.name)
        ly.macs = int(st.macs or 0) if st is not None else 0


def prune_report(before: Any, after: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """MACs and parameters (MAC analysis conventions) before (an Analysis) and after (a skeleton) pruning."""
    from onnxopt.analysis import analyze

    b = analyze(after, input_shapes)
    return {"macs_before": before.macs, "macs_after": b.macs, "params_before": before.params,
            "params_after": b.params}


def remove_dangling_constants(graph: gs.Graph) -> None:
    """Drop ``Constant`` nodes whose output nobody reads any more (after their users got new constants)."""
    outputs = {t.name for t in graph.outputs}
    dead = [n for n in graph.nodes if n.op == "Constant" and all(not t.outputs and t.name not in outputs
                                                                    for t in n.outputs)]
    if dead:
        ids = {id(n) for n in dead}
        for n in dead:
            n.outputs.clear()
        graph.nodes = [n for n in graph.nodes if id(n) not in ids]


def layer_fractions(cg: ChannelGraph, keep_class: np.ndarray, ly: Layer) -> tuple[float, float]:
    """(kept fraction of output channels, kept fraction of input channels per group) of a layer."""
    out_cls, in_cls = cg.layer_classes(ly)
    out_f = float(keep_class[out_cls].mean()) if out_cls is not None and len(out_cls) else 1.0
    in_f = float(keep_class[in_cls].mean()) if in_cls is not None and len(in_cls) else 1.0
    return out_f, in_f


def predicted_macs(cg: ChannelGraph, keep_class: np.ndarray) -> int:
    """Conv/Gemm MACs after pruning: each layer's original MACs scaled by its kept output and input fractions."""
    total = 0.0
    for ly in cg.layers:
        if not ly.macs:
            continue
        out_cls, in_cls = cg.layer_classes(ly)
        f = 1.0
        if out_cls is not None and len(out_cls):
            f *= np.count_nonzero(keep_class[out_cls]) / len(out_cls)
        if in_cls is not None and len(in_cls):
            f *= np.count_nonzero(keep_class[in_cls]) / len(in_cls)
        total += ly.macs * f
    return int(round(total))


# ================================================================================================ selection drivers


def match_any(name: str, patterns: Iterable[str]) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or p == name:
            return p
    return None


def select(
    cg: ChannelGraph,
    imp: np.ndarray,
    *,
    ratio: float | None,
    overrides: dict[str, float],
    target_macs: float | None,
    round_to: int,
    min_channels: int,
    max_ratio: float,
    exclude: tuple[str, ...],
) -> Selection:
    """Which classes to keep. Uniform ``ratio`` per group (with per-layer ``overrides``), or a global ranking of
    importance normalized within each group until the predicted MACs reach ``target_macs`` of the original."""
    keep = np.zeros(cg.n_classes, dtype=bool)
    present = np.zeros(cg.n_classes, dtype=bool)
    present[cg.class_of] = True
    keep[present] = True
    notes: Counter = Counter()
    ratios: dict[int, float] = {}
    free_groups: list[Group] = []
    for g in cg.groups:
        if not g.prunable:
            continue
        members = g.members
        if exclude and any(match_any(m, exclude) for m in members + [g.name]):
            notes["excluded"] += 1
            g.fixed.update({int(c): Reason("excluded", "excluded by pattern") for c in g.classes.tolist()
                            if int(c) not in g.fixed})
            continue
        if not _blocks_consistent(g):
            notes["skipped_conflicting_groups"] += 1
            g.fixed.update({int(c): Reason("conflicting_groups", "grouped convs with different group structures")
                            for c in g.classes.tolist() if int(c) not in g.fixed})
            continue
        if g.size <= max(1, round_to, min_channels):
            notes["skipped_too_small"] += 1
            continue
        r = None
        for pat, val in overrides.items():
            if any(match_any(m, [pat]) for m in g.layers + [g.name]):
                r = val
                break
        if r is None and target_macs is None:
            r = ratio
        if r is None:
            free_groups.append(g)
            continue
        ratios[g.gid] = r
    for gid, r in ratios.items():
        g = cg.groups[gid]
        k = _round_keep(g.size, len(g.fixed), g.size * (1.0 - r), round_to, min_channels)
        keep[g.classes] = _select_in_group(g, imp, k)
    if target_macs is not None and free_groups:
        _select_target(cg, imp, keep, free_groups, target_macs, round_to, min_channels, max_ratio, ratios)
    return Selection(keep, ratios, notes)


def _select_target(cg: ChannelGraph, imp: np.ndarray, keep: np.ndarray, groups: list[Group], target: float,
                   round_to: int, min_channels: int, max_ratio: float, ratios: dict[int, float]) -> None:
    base = sum(ly.macs for ly in cg.layers)
    if base <= 0:
        raise PreconditionError("target_macs: the graph has no Conv/Gemm MACs to prune")
    goal = target * base
    norm: dict[int, np.ndarray] = {}
    selectors = {g.gid: _GroupSelector(g, imp) for g in groups}
    for g in groups:
        v = imp[g.classes].astype(np.float64)
        m = v.mean()
        norm[g.gid] = v / m if m > 0 else np.ones_like(v)

    def apply(tau: float) -> None:
        for g in groups:
            v = norm[g.gid]
            n_fixed = len(g.fixed)
            want = float(np.count_nonzero(v >= tau))
            floor = g.size * (1.0 - max_ratio)
            k = _round_keep(g.size, n_fixed, max(want, floor), round_to, min_channels)
            if k < floor:
                k = min(g.size, k + max(1, round_to))
            keep[g.classes] = selectors[g.gid].keep(k)

    lo, hi = 0.0, float(max(v.max() for v in norm.values())) + 1.0
    apply(lo)
    if predicted_macs(cg, keep) <= goal:
        return
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        apply(mid)
        if predicted_macs(cg, keep) > goal:
            lo = mid
        else:
            hi = mid
    # pick whichever bound lands closer to the goal
    apply(lo)
    m_lo = predicted_macs(cg, keep)
    apply(hi)
    m_hi = predicted_macs(cg, keep)
    if abs(m_lo - goal) < abs(m_hi - goal):
        apply(lo)
    for g in groups:
        ratios[g.gid] = 1.0 - float(keep[g.classes].mean())


# ================================================================================================ reporting


def group_table(cg: ChannelGraph, keep_class: np.ndarray, limit: int = 400) -> str:
    """``name:before->after`` for every group that lost channels, separated by '; ' (at most ``limit`` groups)."""
    parts = []
    for g in cg.groups:
        k = int(keep_class[g.classes].sum())
        if k < g.size:
            parts.append(f"{g.name}:{g.size}->{k}")
    if len(parts) > limit:
        parts = parts[:limit] + [f"... {len(parts) - limit} more"]
    return "; ".join(parts)


def unprunable_summary(cg: ChannelGraph) -> tuple[Counter, list[str]]:
    """Counts of fully unprunable groups by reason key, and one explanation per such group."""
    counts: Counter = Counter()
    details: list[str] = []
    for g in cg.groups:
        if g.prunable or not g.layers:
            continue
        reasons = list({r.key: r for r in g.fixed.values()}.values())
        for r in reasons:
            counts[r.key] += 1
        details.append(f"{g.name}: " + ", ".join(dict.fromkeys(r.detail for r in reasons)))
    return counts, details


def layer_channels(cg: ChannelGraph, keep_class: np.ndarray) -> list[dict[str, Any]]:
    """Per weighted layer: channels before/after on each side (for artifacts and tests)."""
    rows = []
    for ly in cg.layers:
        row: dict[str, Any] = {"node": ly.node.name, "op": ly.node.op, "groups": ly.groups,
                               "depthwise": ly.depthwise, "macs_before": ly.macs}
        out_n = ly.out_channels
        in_n = ly.in_channels
        row["out_before"], row["in_before"] = out_n, in_n
        out_f, in_f = layer_fractions(cg, keep_class, ly)
        out_k = out_n
        if ly.out_name and ly.out_name in cg.layouts and (ly.root or ly.depthwise):
            out_k = int(keep_class[cg.class_of[cg.layouts[ly.out_name].elems]].sum())
        in_k = in_n
        if ly.in_name:
            in_k = int(keep_class[cg.class_of[cg.layouts[ly.in_name].elems]].sum())
        row["out_after"], row["in_after"] = out_k, in_k
        row["macs_after"] = int(round(ly.macs * out_f * in_f))
        rows.append(row)
    return rows


# ================================================================================================ residual blocks


@dataclass
class ResidualBranch:
    """``add`` computes ``x + f(x)``; ``nodes`` are the nodes of f (only used inside the branch)."""

    add: gs.Node
    skip: gs.Tensor  # x
    branch_out: gs.Tensor  # f(x)
    nodes: list[gs.Node]


def find_residual_branches(graph: gs.Graph) -> tuple[list[ResidualBranch], Counter]:
    """Residual joins ``Add(x, f(x))`` whose branch f reads only x (and constants) and is used only by the Add."""
    outputs = {t.name for t in graph.outputs}
    consumers: dict[str, list[gs.Node]] = defaultdict(list)
    for n in graph.nodes:
        for t in n.inputs:
            if t is not None and t.name:
                consumers[t.name].append(n)
    found: list[ResidualBranch] = []
    notes: Counter = Counter()
    for add in graph.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or not _is_default_domain(add):
            continue
        a, b = add.inputs
        if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
            continue
        branch = None
        for skip, out in ((a, b), (b, a)):
            nodes = _branch_nodes(skip, out, consumers, outputs, add)
            if nodes:
                branch = ResidualBranch(add, skip, out, nodes)
                break
        if branch is None:
            notes["skipped_not_identity_residual"] += 1
            continue
        if add.outputs[0].name in outputs and branch.skip in graph.inputs:
            notes["skipped_graph_io"] += 1
            continue
        found.append(branch)
    return found, notes


def _branch_nodes(skip: gs.Tensor, out: gs.Tensor, consumers, outputs: set[str], add: gs.Node) -> list[gs.Node]:
    """Nodes between ``skip`` and ``out`` if they form a closed branch, else []."""
    if skip.name == out.name:
        return []
    nodes: list[gs.Node] = []
    seen: set[int] = set()
    stack = [out]
    while stack:
        t = stack.pop()
        if t.name == skip.name or isinstance(t, gs.Constant) or const_value(t) is not None:
            continue
        if len(t.inputs) != 1:
            return []  # reaches a graph input other than x
        n = t.inputs[0]
        if id(n) in seen:
            continue
        seen.add(id(n))
        nodes.append(n)
        stack.extend(n.inputs)
    if not nodes:
        return []
    node_ids = {id(n) for n in nodes}
    reads_skip = False
    for n in nodes:
        if any(t is not None and t.name == skip.name for t in n.inputs):
            reads_skip = True
        for t in n.outputs:
            if t.name in outputs:
                return []
            for c in consumers.get(t.name, []):
                if id(c) not in node_ids and c is not add:
                    return []
    return nodes if reads_skip else []
