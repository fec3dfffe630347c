"""MACs, FLOPs, parameters and memory of an ONNX model.

Used by the ``mac`` pass, ``onnxopt mac``, the pruning pass and the before/after figures of ``onnxopt run``
(:func:`summarize`). Shapes come from ONNX shape inference on a weight-stripped copy of the graph
(:class:`onnxopt.skeleton.Skeleton`), so the analysis of a 100 MB model costs milliseconds, not seconds.

Definitions
-----------
**MACs** (multiply-accumulates) are counted for the layers papers count, with the batch included:

=================  ==================================================================================================
Conv               ``N * OH * OW * OC * KH * KW * (IC / groups)`` (= N * output spatial * prod(W.shape)); 1-D/3-D alike
ConvTranspose      ``N * IH * IW * IC * KH * KW * (OC / groups)`` (every input pixel is scattered over the kernel)
ConvInteger,       as Conv
QLinearConv
Gemm               ``M * K * N`` of ``op(A)[M, K] @ op(B)[K, N]`` with ``transA``/``transB`` applied
MatMul (+Integer,  ``prod(broadcast batch dims) * M * K * N`` (numpy rules, 1-D operands promoted)
QLinearMatMul)
Einsum             two operands whose summed indices appear in both: the product of all index sizes (and of the
                   broadcast ``...`` dims); one operand: 0 MACs; otherwise *unknown* with the reason
Attention (op 23)  ``B * Hq * Sq * Skv * (D + Dv)`` (Q·Kᵀ and P·V)
LSTM / GRU / RNN   ``seq * batch * (prod(W.shape) + prod(R.shape))`` (input and recurrent projections)
=================  ==================================================================================================

Bias additions are not MACs (they are FLOPs below).

**FLOPs** are the other arithmetic, counted separately from MACs (papers quote Conv/Gemm MACs; mixing the two is why
some tools report 4.45 G for ResNet-50 instead of 4.09 G). Unit costs, per *output* element unless noted:

======================================================  =============================================================
bias of Conv/ConvTranspose/Gemm/QLinearConv             1
Add Sub Mul Div Pow Mod Min Max Sum (k inputs),         k - 1 (one per operation); Mean: k
comparisons, logic, bit ops
Relu Abs Neg Sign Floor Ceil Round Exp Log Sqrt         1 (every elementary function counts 1)
Reciprocal Tanh Erf Sin Cos ... Not IsNaN IsInf Where
LeakyRelu PRelu Clip ThresholdedRelu                    2 (compare/select + multiply or the second bound)
Softplus Softsign                                       3
Sigmoid HardSigmoid Elu Celu                            4
HardSwish Selu Mish                                     5
Gelu                                                    5 (erf form), 9 (``approximate="tanh"``)
BatchNormalization (inference)                          2 (per-channel multiply-add)
Instance/Layer/GroupNormalization                       7 (mean, subtract, square, variance, normalize, scale, shift)
RMSNormalization                                        4 (square, mean, normalize, scale)
MeanVarianceNormalization                               5
LpNormalization                                         3
LRN                                                     2 * size + 3
Softmax LogSoftmax                                      5 per input element (max, subtract, exp, sum, divide)
MaxPool AveragePool LpPool                              prod(kernel_shape) (window size; AveragePool's divide included)
GlobalMaxPool / GlobalAveragePool / GlobalLpPool        per *input* element 1; AveragePool also 1 per output element
Reduce{Sum,Max,Min,Prod}, ArgMax/ArgMin                 1 per input element; ReduceMean: + 1 per output element
ReduceL1 ReduceSumSquare / ReduceL2 ReduceLogSumExp     2 per input element (+ 1 per output for L2, LogSum(Exp))
Resize / Upsample                                       nearest: 0 (a copy); linear over k resized axes: 2^(k+1) - 1
                                                        (2^k multiplies, 2^k - 1 adds); cubic: 2 * 4^k - 1
QuantizeLinear 3, DequantizeLinear 2, CumSum 1          per element
LSTM 17 (+8 with B), GRU 15 (+6), RNN 2 (+2)            per (step, batch, direction, hidden unit): gates and state
Data movement: Reshape Transpose Concat Split Slice     0
Gather Pad Tile Expand Cast Identity Shape ...
======================================================  =============================================================

Any other op (custom domains, control flow) is reported as *unknown* with its reason, never silently as zero; the
totals are then lower bounds and :func:`summarize` reports ``macs = None``.

**Parameters** follow PyTorch's convention (the convention of the published counts): the elements of the constant
tensors that feed a parameter input — Conv/ConvTranspose weight and bias, Gemm/MatMul/Einsum constant operands, the
scale and bias of BatchNormalization and the other normalizations, PRelu slopes, RNN weights, Gather tables
(embeddings), and the non-scalar float constants of Add/Sub/Mul/Div (the bias of a MatMul+Add ``Linear``, layer
scales). A constant reached through DequantizeLinear/Cast/Transpose/Reshape/(Un)Squeeze/Flatten/Identity counts too
(quantized or fp16 weights). BatchNormalization's running mean and variance are **buffers**, reported separately.
Every other constant (shape tensors, Resize scales, Clip bounds, scalars, quantization scales) is a **constant**.
A tensor shared by several nodes is counted once (and attributed to its first consumer in the per-layer table).

**Weight bytes** are the bytes of the constant tensors; **output bytes** of a layer are the bytes of its outputs.

**Peak activation memory** is the largest sum of live activation bytes when the nodes run one at a time in the
graph's (topological) order. Node *i* runs at step *i*. A tensor produced at step *p* and last read at step *c* is live
at every step *p..c* (during node *i* both its inputs and its outputs are live); graph inputs are live from step 0;
graph outputs stay live to the last step; a tensor nobody reads is live only at its producer's step. Constants
(initializers and Constant-node outputs) are weights, not activations, and are not counted. Values captured by a
subgraph (If/Loop/Scan) are read by the node that owns the subgraph; the subgraph's own temporaries are not counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper

from onnxopt.errors import OnnxoptError, first_line
from onnxopt.skeleton import ConstInfo, Shape, Skeleton, nbytes, typed_shapes

# ---------------------------------------------------------------------------------------------------------------------
# Unit costs (see the module docstring)

_ZERO_COST = frozenset(
    """Reshape Flatten Squeeze Unsqueeze Transpose Concat Split Slice Gather GatherElements GatherND Scatter
    ScatterElements ScatterND Pad Tile Expand Identity Dropout Shape Size Constant ConstantOfShape Cast CastLike
    DepthToSpace SpaceToDepth Range NonZero Compress OneHot Trilu EyeLike ReverseSequence SplitToSequence
    ConcatFromSequence SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
    Optional OptionalGetElement OptionalHasElement""".split()
)
_VARIADIC = frozenset(
    """Add Sub Mul Div Pow Mod Max Min Sum And Or Xor Equal Greater Less GreaterOrEqual LessOrEqual BitShift
    BitwiseAnd BitwiseOr BitwiseXor""".split()
)
_UNARY: dict[str, int] = {
    **dict.fromkeys(
        """Relu Abs Neg Sign Floor Ceil Round Exp Log Sqrt Reciprocal Tanh Erf Sin Cos Tan Asin Acos Atan Sinh Cosh
        Asinh Acosh Atanh Not IsNaN IsInf BitwiseNot Hardmax CumSum Where""".split(), 1),
    **dict.fromkeys("LeakyRelu PRelu Clip ThresholdedRelu".split(), 2),
    **dict.fromkeys("Softplus Softsign".split(), 3),
    **dict.fromkeys("Sigmoid HardSigmoid Elu Celu".split(), 4),
    **dict.fromkeys("HardSwish Selu Mish".split(), 5),
    "BatchNormalization": 2,
    "InstanceNormalization": 7, "LayerNormalization": 7, "GroupNormalization": 7,
    "RMSNormalization": 4, "MeanVarianceNormalization": 5, "LpNormalization": 3,
    "QuantizeLinear": 3, "DequantizeLinear": 2,
}
_POOL = frozenset({"MaxPool", "AveragePool", "LpPool"})
_GLOBAL_POOL = frozenset({"GlobalMaxPool", "GlobalAveragePool", "GlobalLpPool"})
#: reduce op -> (FLOPs per input element, FLOPs per output element)
_REDUCE = {
    "ReduceSum": (1, 0), "ReduceMax": (1, 0), "ReduceMin": (1, 0), "ReduceProd": (1, 0), "ArgMax": (1, 0),
    "ArgMin": (1, 0), "ReduceMean": (1, 1), "ReduceL1": (2, 0), "ReduceSumSquare": (2, 0), "ReduceL2": (2, 1),
    "ReduceLogSum": (1, 1), "ReduceLogSumExp": (2, 1),
}
#: (gate FLOPs, extra FLOPs with the bias input B) per step, batch, direction and hidden unit
_RNN_FLOPS = {"LSTM": (17, 8), "GRU": (15, 6), "RNN": (2, 2)}

# Parameter inputs per op (see "Parameters" in the module docstring); None = every input.
_PARAM_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "ConvInteger": (1,), "QLinearConv": (3, 8),
    "Gemm": (0, 1, 2), "MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "Einsum": None,
    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2), "RMSNormalization": (1,), "PRelu": (1,),
    "LSTM": (1, 2, 3), "GRU": (1, 2, 3), "RNN": (1, 2, 3), "Gather": (0,),
}
_BUFFER_INPUTS = {"BatchNormalization": (3, 4)}
_ARITH = frozenset({"Add", "Sub", "Mul", "Div"})
#: ops a weight may pass through on its way to a parameter input (input 0 is the weight)
_WEIGHT_PATH = frozenset(
    {"DequantizeLinear", "Cast", "CastLike", "Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
)


class _Unknown(Exception):
    """This node's cost cannot be computed; the message is the reason."""


# ---------------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class LayerStats:
    """Figures of one node. ``macs``/``flops`` are None when unknown (``note`` says why)."""

    index: int
    name: str
    op_type: str
    macs: int | None
    flops: int | None
    params: int
    buffers: int
    weight_bytes: int
    output_bytes: int | None
    output_shapes: list[list[int | str | None] | None]
    note: str = ""


@dataclass
class PeakMemory:
    """Peak activation memory (see the module docstring for the definition)."""

    bytes: int
    step: int
    node: str
    live: list[tuple[str, int]]  # (tensor, bytes) live at the peak, largest first


@dataclass
class Analysis:
    """The full report of :func:`analyze`."""

    layers: list[LayerStats]
    input_shapes: dict[str, tuple[int, ...]]
    params: int
    buffers: int
    constants: int
    weight_bytes: int
    peak: PeakMemory | None
    peak_note: str = ""
    by_name: dict[str, LayerStats] = field(default_factory=dict, repr=False)

    @property
    def macs(self) -> int:
        """Sum of the known MACs (a lower bound when :attr:`complete` is False)."""
        return sum(layer.macs or 0 for layer in self.layers)

    @property
    def flops(self) -> int:
        """Sum of the known non-MAC FLOPs."""
        return sum(layer.flops or 0 for layer in self.layers)

    @property
    def unknown(self) -> list[LayerStats]:
        return [layer for layer in self.layers if layer.macs is None or layer.flops is None]

    @property
    def complete(self) -> bool:
        """True when every node's MACs and FLOPs are known."""
        return not self.unknown

    @property
    def activation_bytes(self) -> int | None:
        """Sum of the output bytes of every node (None when a shape is unknown)."""
        if any(layer.output_bytes is None for layer in self.layers):
            return None
        return sum(layer.output_bytes or 0 for layer in self.layers)

    def by_op(self) -> dict[str, dict[str, Any]]:
        """Totals per op type, largest MACs first: count, macs, flops, params, unknown (nodes with unknown cost)."""
        out: dict[str, dict[str, Any]] = {}
        for layer in self.layers:
            row = out.setdefault(layer.op_type, {"count": 0, "macs": 0, "flops": 0, "params": 0, "unknown": 0})
            row["count"] += 1
            row["macs"] += layer.macs or 0
            row["flops"] += layer.flops or 0
            row["params"] += layer.params
            row["unknown"] += layer.macs is None or layer.flops is None
        return dict(sorted(out.items(), key=lambda kv: (-kv[1]["macs"], -kv[1]["flops"], kv[0])))

    def top(self, n: int, key: str = "macs") -> list[LayerStats]:
        """The ``n`` layers with the most ``key`` (macs, flops, params, output_bytes), ties in graph order."""
        return sorted(self.layers, key=lambda layer: (-(getattr(layer, key) or 0), layer.index))[:n]

    def totals(self) -> dict[str, Any]:
        """Headline figures (what ``mac`` puts in its stats)."""
        return {
            "params": self.params,
            "buffers": self.buffers,
            "constants": self.constants,
            "weight_bytes": self.weight_bytes,
            "macs": self.macs if self.complete else None,
            "macs_known": self.macs,
            "flops": self.flops if self.complete else None,
            "flops_known": self.flops,
            "peak_activation_bytes": self.peak.bytes if self.peak else None,
            "nodes": len(self.layers),
            "unknown_nodes": len(self.unknown),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "totals": self.totals(),
            "peak_memory": asdict(self.peak) if self.peak else None,
            "peak_note": self.peak_note,
            "by_op": self.by_op(),
            "unknown": [{"name": u.name, "op_type": u.op_type, "reason": u.note} for u in self.unknown],
            "layers": [asdict(layer) for layer in self.layers],
        }


# ---------------------------------------------------------------------------------------------------------------------
# Entry points


def analyze(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None, *, check: bool = False,
    skeleton: Skeleton | None = None,
) -> Analysis:
    """Analyze ``model``. ``input_shapes`` fix dynamic input dims (never guessed: a dynamic input without a shape
    raises :class:`~onnxopt.errors.PreconditionError` naming it). ``check`` runs the ONNX checker on the structure.

    ``skeleton``: an already prepared skeleton of ``model`` (e.g. with new input shapes from set-input-shape).
    """
    from onnxopt.shapes import resolve_input_shapes

    skel = skeleton if skeleton is not None else Skeleton(model)
    resolved = resolve_input_shapes(skel.inputs_model(), input_shapes)
    if input_shapes:
        skel.set_input_shapes(resolved)
    if check:
        skel.check()
    try:
        inferred = skel.infer()
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        first = first_line(e)
        raise OnnxoptError(f"shape inference failed: {first}") from e
    return _Analyzer(inferred, skel.constants).run(resolved)


def summarize(model: onnx.ModelProto, ctx: Any = None) -> dict[str, Any]:
    """Size and cost figures for the run report; never raises.

    Keys: those of :func:`onnxopt.pass_manager.graph_summary` (nodes, initializers, weight_elements, weight_bytes)
    plus params, buffers, macs, flops, peak_activation_bytes. ``macs``/``flops``/``peak_activation_bytes`` are None
    when shapes are dynamic (and not given in ``ctx.input_shapes``) or a node's cost is unknown; ``macs_note`` says why.
    """
    from onnxopt.pass_manager import graph_summary

    out: dict[str, Any] = graph_summary(model)
    out.update(params=None, buffers=None, macs=None, flops=None, peak_activation_bytes=None)
    from onnxopt.shapes import batch_defaulted, resolve_input_shapes

    try:
        skel = Skeleton(model)
        given = applicable_shapes(skel.inputs_model(), getattr(ctx, "input_shapes", None) or {})
        # A dynamic batch alone is read as 1: the report's MACs are then per sample (and say so).
        shapes = resolve_input_shapes(skel.inputs_model(), given, default_batch=1)
        defaulted = batch_defaulted(skel.inputs_model(), given)
        a = analyze(model, shapes, skeleton=skel)
    except Exception as e:  # noqa: BLE001 - a summary must never fail the run
        out["macs_note"] = first_line(e)
        return out
    if defaulted:
        out["macs_note"] = f"per sample: dynamic batch of {', '.join(defaulted)} read as 1"
    t = a.totals()
    out.update(params=t["params"], buffers=t["buffers"], macs=t["macs"], flops=t["flops"],
               peak_activation_bytes=t["peak_activation_bytes"])
    if not a.complete:
        u = a.unknown[0]
        out["macs_note"] = f"{len(a.unknown)} node(s) with unknown cost, e.g. {u.name} ({u.op_type}): {u.note}"
    return out


def applicable_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The shapes in ``shapes`` that apply to ``model``: those of inputs that still have dynamic dims, where they agree
    with the static dims (after a pass such as set-input-shape the user's ``--input-shape`` may no longer apply)."""
    from onnxopt.shapes import graph_inputs

    out = {}
    for spec in graph_inputs(model):
        want = shapes.get(spec.name)
        if want is None or spec.is_static or len(want) != len(spec.shape):
            continue
        if all(not isinstance(h, int) or h == w for h, w in zip(spec.shape, want)):
            out[spec.name] = want
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The analyzer


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.type != onnx.AttributeProto.GRAPH
            and a.type != onnx.AttributeProto.GRAPHS}


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names read by the subgraphs of ``node`` (outer-scope captures included), recursively."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names.update(_subgraph_inputs(n))
    return names


class _Analyzer:
    def __init__(self, inferred: onnx.ModelProto, constants: dict[str, ConstInfo]) -> None:
        self.model = inferred
        self.graph = inferred.graph
        self.nodes = list(self.graph.node)
        self.constants = constants
        self.types = typed_shapes(inferred)
        self.producer: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i

    # -- shapes ------------------------------------------------------------------------------------------------------
    def shape(self, name: str) -> Shape | None:
        if name in self.constants:
            return self.constants[name].dims
        t = self.types.get(name)
        return t[1] if t else None

    def static(self, name: str) -> tuple[int, ...]:
        s = self.shape(name)
        if s is None or any(not isinstance(d, int) for d in s):
            raise _Unknown(f"shape of {name!r} unknown ({list(s) if s is not None else 'no shape'})")
        return tuple(s)  # type: ignore[arg-type]

    def tensor_bytes(self, name: str) -> int | None:
        if name in self.constants:
            return self.constants[name].nbytes
        t = self.types.get(name)
        if t is None:
            return None
        return nbytes(t[0], t[1])

    # -- parameters --------------------------------------------------------------------------------------------------
    def origins(self, name: str, via_dq: bool = False, depth: int = 0) -> list[tuple[str, bool]]:
        """Constants a weight input comes from, through weight-path ops; (name, passed a DequantizeLinear)."""
        if name in self.constants:
            return [(name, via_dq)]
        i = self.producer.get(name)
        if i is None or depth > 16:
            return []
        n = self.nodes[i]
        if n.op_type not in _WEIGHT_PATH or n.domain not in ("", "ai.onnx") or not n.input:
            return []
        return self.origins(n.input[0], via_dq or n.op_type == "DequantizeLinear", depth + 1)

    def classify(self) -> dict[str, tuple[str, int]]:
        """Constant name -> (class, index of the node it is attributed to); class: param/buffer/constant."""
        rank = {"param": 0, "buffer": 1, "constant": 2}
        cls: dict[str, str] = {}
        owner: dict[str, tuple[int, int]] = {}  # name -> (rank of the claim, node index)

        def claim(name: str, kind: str, idx: int) -> None:
            if kind != "constant" and rank[kind] < rank[cls.get(name, "constant")]:
                cls[name] = kind
            cls.setdefault(name, kind)
            prev = owner.get(name)
            if prev is None or rank[kind] < prev[0]:
                owner[name] = (rank[kind], idx)

        for i, n in enumerate(self.nodes):
            op = n.op_type if n.domain in ("", "ai.onnx") else None
            slots = _PARAM_INPUTS.get(op, ()) if op else ()
            for j, name in enumerate(n.input):
                if not name:
                    continue
                is_param_slot = slots is None or j in slots
                if op in _ARITH:
                    is_param_slot = True
                if is_param_slot:
                    for c, via_dq in self.origins(name):
                        info = self.constants[c]
                        if (info.is_float or via_dq) and (op not in _ARITH or info.numel > 1):
                            claim(c, "param", i)
                if op in _BUFFER_INPUTS and j in _BUFFER_INPUTS[op]:
                    for c, _ in self.origins(name):
                        claim(c, "buffer", i)
                if name in self.constants:
                    claim(name, "constant", i)
        return {name: (cls[name], owner[name][1]) for name in cls}

    # -- costs -------------------------------------------------------------------------------------------------------
    def cost(self, n: onnx.NodeProto) -> tuple[int, int]:
        """(MACs, FLOPs) of one node; raises _Unknown."""
        op = n.op_type
        if n.domain not in ("", "ai.onnx"):
            raise _Unknown(f"no cost model for custom op {n.domain}::{op}")
        if op in _ZERO_COST:
            return 0, 0
        fn = _COSTS.get(op)
        if fn is not None:
            return fn(self, n, _attrs(n))
        if op in _VARIADIC:
            k = sum(1 for x in n.input if x)
            return 0, max(k - 1, 1) * self.out_numel(n)
        if op == "Mean":
            return 0, sum(1 for x in n.input if x) * self.out_numel(n)
        if op in _UNARY:
            return 0, _UNARY[op] * self.out_numel(n)
        if op in _POOL:
            kernel = _attrs(n).get("kernel_shape")
            if not kernel:
                raise _Unknown(f"{op} without kernel_shape")
            return 0, math.prod(kernel) * self.out_numel(n)
        if op in _GLOBAL_POOL:
            extra = self.out_numel(n) if op == "GlobalAveragePool" else 0
            return 0, math.prod(self.static(n.input[0])) + extra
        if op in _REDUCE:
            per_in, per_out = _REDUCE[op]
            return 0, per_in * math.prod(self.static(n.input[0])) + per_out * self.out_numel(n)
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise _Unknown(f"control flow ({op}): the subgraph is not analysed")
        raise _Unknown(f"no cost model for {op}")

    def out_numel(self, n: onnx.NodeProto, i: int = 0) -> int:
        return math.prod(self.static(n.output[i]))

    # -- the run -----------------------------------------------------------------------------------------------------
    def run(self, input_shapes: dict[str, tuple[int, ...]]) -> Analysis:
        classes = self.classify()
        per_node: dict[int, dict[str, int]] = {}
        totals = {"param": 0, "buffer": 0, "constant": 0}
        weight_bytes = 0
        for name, (kind, idx) in classes.items():
            info = self.constants[name]
            totals[kind] += info.numel
            weight_bytes += info.nbytes
            row = per_node.setdefault(idx, {"param": 0, "buffer": 0, "bytes": 0})
            if kind in ("param", "buffer"):
                row[kind] += info.numel
            row["bytes"] += info.nbytes
        for name, info in self.constants.items():  # constants nobody reads
            if name not in classes:
                totals["constant"] += info.numel
                weight_bytes += info.nbytes

        layers: list[LayerStats] = []
        for i, n in enumerate(self.nodes):
            note = ""
            try:
                macs, flops = self.cost(n)
            except _Unknown as e:
                macs = flops = None
                note = str(e)
            except (ValueError, ZeroDivisionError, IndexError, KeyError, TypeError) as e:
                macs = flops = None
                note = f"cannot compute the cost: {type(e).__name__}: {e}"
            out_bytes: int | None = 0
            shapes: list[list[int | str | None] | None] = []
            for o in n.output:
                if not o:
                    continue
                s = self.shape(o)
                shapes.append(list(s) if s is not None else None)
                b = self.tensor_bytes(o)
                out_bytes = None if b is None or out_bytes is None else out_bytes + b
            row = per_node.get(i, {"param": 0, "buffer": 0, "bytes": 0})
            layers.append(LayerStats(
                index=i, name=n.name or f"{n.op_type}#{i}", op_type=n.op_type, macs=macs, flops=flops,
                params=row["param"], buffers=row["buffer"], weight_bytes=row["bytes"], output_bytes=out_bytes,
                output_shapes=shapes, note=note,
            ))
        peak, peak_note = self.peak_memory()
        a = Analysis(
            layers=layers, input_shapes=dict(input_shapes), params=totals["param"], buffers=totals["buffer"],
            constants=totals["constant"], weight_bytes=weight_bytes, peak=peak, peak_note=peak_note,
        )
        a.by_name = {layer.name: layer for layer in layers}
        return a

    def peak_memory(self) -> tuple[PeakMemory | None, str]:
        n_steps = len(self.nodes)
        if n_steps == 0:
            return None, "empty graph"
        birth: dict[str, int] = {}
        death: dict[str, int] = {}
        for vi in self.graph.input:
            if vi.name not in self.constants:
                birth[vi.name] = 0
                death[vi.name] = 0
        for i, n in enumerate(self.nodes):
            reads = set(n.input) | _subgraph_inputs(n)
            for name in reads:
                if name in birth:
                    death[name] = max(death[name], i)
            for o in n.output:
                if o and o not in self.constants and o not in birth:
                    birth[o] = death[o] = i
        for vi in self.graph.output:
            if vi.name in birth:
                death[vi.name] = n_steps - 1
        sizes: dict[str, int] = {}
        for name in birth:
            b = self.tensor_bytes(name)
            if b is None:
                return None, f"size of {name!r} unknown"
            sizes[name] = b
        delta = [0] * (n_steps + 1)
        for name, size in sizes.items():
            delta[birth[name]] += size
            delta[death[name] + 1] -= size
        best, best_step, cur = -1, 0, 0
        for i in range(n_steps):
            cur += delta[i]
            if cur > best:
                best, best_step = cur, i
        live = sorted(
            ((name, sizes[name]) for name in sizes if birth[name] <= best_step <= death[name]),
            key=lambda kv: (-kv[1], kv[0]),
        )
        node = self.nodes[best_step]
        return PeakMemory(bytes=best, step=best_step, node=node.name or f"{node.op_type}#{best_step}", live=live), ""


# ---------------------------------------------------------------------------------------------------------------------
# Per-op cost functions: (analyzer, node, attrs) -> (MACs, FLOPs)

CostFn = Callable[[_Analyzer, onnx.NodeProto, dict[str, Any]], tuple[int, int]]


def _bias_flops(a: _Analyzer, n: onnx.NodeProto, bias_index: int) -> int:
    return a.out_numel(n) if len(n.input) > bias_index and n.input[bias_index] else 0


def _conv(weight_index: int, bias_index: int | None) -> CostFn:
    def cost(a: _Analyzer, n: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[int, int]:
        y = a.static(n.output[0])
        w = a.static(n.input[weight_index])
        if len(y) < 2 or len(w) != len(y):
            raise _Unknown(f"unexpected shapes: output {list(y)}, weight {list(w)}")
        macs = y[0] * math.prod(y[2:]) * math.prod(w)
        return macs, _bias_flops(a, n, bias_index) if bias_index is not None else 0
    return cost


def _conv_transpose(a: _Analyzer, n: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[int, int]:
    x = a.static(n.input[0])
    w = a.static(n.input[1])
    if len(x) < 2 or len(w) != len(x):
        raise _Unknown(f"unexpected shapes: input {list(x)}, weight {list(w)}")
    return x[0] * math.prod(x[2:]) * math.prod(w), _bias_flops(a, n, 2)


def _gemm(a: _Analyzer, n: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[int, int]:
    sa, sb = a.static(n.input[0]), a.static(n.input[1])
    if len(sa) != 2 or len(sb) != 2:
        raise _Unknown(f"Gemm operands must be 2-D, got {list(sa)} and {list(sb)}")
    m, k = (sa[1], sa[0]) if attrs.get("transA", 0) else sa
    k2, nn = (sb[1], sb[0]) if attrs.get("transB", 0) else sb
    if k != k2:
        raise _Unknown(f"inner dims differ: {k} vs {k2}")
    flops = 0
    if len(n.input) > 2 and n.input[2]:
        flops += m * nn  # + beta * C
    return m * k * nn, flops


def matmul_macs(sa: tuple[int, ...], sb: tuple[int, ...]) -> int:
    """MACs of ``numpy.matmul`` on operands of shapes ``sa`` and ``sb`` (batch dims broadcast, 1-D promoted)."""
    if not sa or not sb:
        raise ValueError("MatMul operands must have rank >= 1")
    a2 = (1, *sa) if len(sa) == 1 else tuple(sa)
    b2 = (*sb, 1) if len(sb) == 1 else tuple(sb)
    if a2[-1] != b2[-2]:
        raise ValueError(f"inner dims differ: {list(sa)} @ {list(sb)}")
    batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    return math.prod(batch) * a2[-2] * a2[-1] * b2[-1]


def _matmul(ia: int, ib: int) -> CostFn:
    def cost(a: _Analyzer, n: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[int, int]:
        return matmul_macs(a.static(n.input[ia]), a.static(n.input[ib])), 0
    return cost


def einsum_macs(equation: str, shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """(MACs, FLOPs) of an Einsum; raises ValueError (with the reason) for equations without a matmul-like cost."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"equation {equation!r} has {len(terms)} operands, node has {len(shapes)}")
    sizes: dict[str, int] = {}
    ellipses: list[tuple[int, ...]] = []
    counts: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        letters = term.replace("...", "")
        if len(set(letters)) != len(letters):
            raise ValueError(f"repeated index in operand {term!r} (diagonal) has no matmul-like cost")
        n_ell = len(shape) - len(letters)
        if "..." in term:
            pos = term.index("...")
            dims = list(shape[:pos]) + list(shape[pos + n_ell:])
            ellipses.append(tuple(shape[pos:pos + n_ell]))
        elif n_ell != 0:
            raise ValueError(f"operand {term!r} does not match rank {len(shape)}")
        else:
            dims = list(shape)
        for letter, d in zip(letters, dims):
            prev = sizes.get(letter, 1)
            if prev != d and prev != 1 and d != 1:
                raise ValueError(f"index {letter!r} has sizes {prev} and {d}")
            sizes[letter] = max(prev, d)
            counts[letter] = counts.get(letter, 0) + 1
    ell = math.prod(np.broadcast_shapes(*ellipses)) if ellipses else 1
    out = set(rhs.replace("...", "")) if arrow else {c for c, k in counts.items() if k == 1}
    summed = [c for c in sizes if c not in out]
    if len(terms) == 1:
        total = ell * math.prod(sizes.values())
        return 0, total if summed else 0
    if len(terms) > 2:
        raise ValueError(f"{len(terms)} operands: the cost depends on the contraction order")
    lone = [c for c in summed if counts[c] < 2]
    if lone:
        raise ValueError(f"index {lone[0]!r} is summed within one operand (not matmul-like)")
    return ell * math.prod(sizes.values()), 0


def _einsum(a: _Analyzer, n: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[int, int]:
    eq = attrs.get("equation", b"")
    eq = eq.decode() if isinstance(eq, bytes) else str(eq)
    try:
        return einsum_macs(eq, [a.static(x) for x in n.input])
    except ValueError as e:
        raise _Unknown(f"Einsum {eq!r}: {e}") from None


def _attention(a: _Analyzer, n: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[int, int]:
    q, k, v = (a.static(x) for x in n.input[:3])
    past = a.static(n.input[4]) if len(n.input) > 4 and n.input[4] else None
    if len(q) == 4:
        b, hq, sq, d = q
        skv, dv = k[-2], v[-1]
    elif len(q) == 3:
        hq, hkv = attrs.get("q_num_heads"), attrs.get("kv_num_heads")
        if not hq or not hkv:
            raise _Unknown("3-D Attention without q_num_heads/kv_num_heads")
        b, sq, d = q[0], q[1], q[2] // hq
        skv, dv = k[1], v[2] // hkv
    else:
        raise _Unknown(f"Attention with rank-{len(q)} Q")
    if past is not None:
        skv += past[-2]
    macs = b * hq * sq * skv * (d + dv)
    return macs, 5 * b * hq * sq * skv  # the softmax over the scores


def _resize(a: _Analyzer, n: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[int, int]:
    x, y = a.static(n.input[0]), a.static(n.output[0])
    mode = attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    k = sum(1 for i, o in zip(x, y) if i != o)
    per = {"nearest": 0, "linear": 2 ** (k + 1) - 1, "bilinear": 2 ** (k + 1) - 1, "cubic": 2 * 4 ** k - 1}.get(mode)
    if per is None:
        raise _Unknown(f"{n.op_type} mode {mode!r}")
    return 0, per * math.prod(y) if k else 0


def _gelu(a: _Analyzer, n: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[int, int]:
    approx = attrs.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else str(approx)
    return 0, (9 if approx == "tanh" else 5) * a.out_numel(n)


def _lrn(a: _Analyzer, n: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[int, int]:
    return 0, (2 * int(attrs.get("size", 1)) + 3) * a.out_numel(n)


def _rnn(a: _Analyzer, n: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[int, int]:
    x, w, r = a.static(n.input[0]), a.static(n.input[1]), a.static(n.input[2])
    seq, batch = (x[1], x[0]) if attrs.get("layout", 0) else (x[0], x[1])
    dirs, hidden = w[0], r[-1]
    gate, bias = _RNN_FLOPS[n.op_type]
    has_b = len(n.input) > 3 and bool(n.input[3])
    flops = seq * batch * dirs * hidden * (gate + (bias if has_b else 0))
    return seq * batch * (math.prod(w) + math.prod(r)), flops


_COSTS: dict[str, CostFn] = {
    "Conv": _conv(1, 2), "ConvInteger": _conv(1, None), "QLinearConv": _conv(3, 8),
    "ConvTranspose": _conv_transpose, "Gemm": _gemm,
    "MatMul": _matmul(0, 1), "MatMulInteger": _matmul(0, 1), "QLinearMatMul": _matmul(0, 3),
    "Einsum": _einsum, "Attention": _attention, "Resize": _resize, "Upsample": _resize,
    "Gelu": _gelu, "LRN": _lrn, "LSTM": _rnn, "GRU": _rnn, "RNN": _rnn,
    "Softmax": lambda a, n, at: (0, 5 * a.out_numel(n)),
    "LogSoftmax": lambda a, n, at: (0, 5 * a.out_numel(n)),
}


__all__ = [
    "Analysis", "LayerStats", "PeakMemory", "analyze", "summarize", "applicable_shapes", "matmul_macs", "einsum_macs",
]
