"""``trt-check``: will TensorRT's ONNX parser take this model? A static check that needs no TensorRT and no GPU.

The operator table follows onnx-tensorrt's ``docs/operators.md`` for **TensorRT 10.x** (release/10.x branch, as of
TensorRT 10.8; ops listed there as supported are ``SUPPORTED_OPS``, ops listed as not supported are
``UNSUPPORTED_OPS``, and a selection of its per-op restrictions is checked). Newer TensorRT releases support more; an op
in neither list is reported as a warning, not an error. The Q/DQ rules are those of TensorRT 10's explicit
quantization (developer guide, "Working with Quantized Types"): zero points must be 0, quantized types are INT8 and
FP8 (E4M3), plus INT4/FP4 for weights only; scales must be constant and positive, either per-tensor (a scalar) or
per-channel (1-D, one scale per channel of ``axis``), and per-channel scales only on weights (constants).

Each :class:`Finding` names its node (or input/tensor), its op, a severity (``error``: the parser or builder rejects
the model; ``warning``: it builds, but check the behaviour) and a stable ``code``:

======================== ========= =====================================================================
code                     severity  meaning
======================== ========= =====================================================================
UNSUPPORTED_OP           error     operator listed as not supported by TensorRT's ONNX parser
CUSTOM_OP                error     operator outside the ONNX domain (needs a TensorRT plugin of that name)
UNKNOWN_OP               warning   operator not in the TensorRT 10 table (newer op): check your release
UNSUPPORTED_ATTR         error     attribute value or input the parser rejects for this op
UNSUPPORTED_TYPE         error     tensor type TensorRT has no equivalent for (string, complex, double I/O, ...)
DOUBLE_CAST              warning   DOUBLE constant/tensor: TensorRT has no FP64 and computes it in FP32
INT64_CAST               warning   INT64 tensors: TensorRT computes them in INT32 where its layers lack INT64
INT64_RANGE              warning   INT64 constant with values outside the INT32 range (clamped when cast)
QDQ_ZERO_POINT           error     Q/DQ zero point is not 0
QDQ_TYPE                 error     Q/DQ quantized type is not INT8/FP8 (or INT4/FP4 on weights)
QDQ_NONCONST             error     Q/DQ scale or zero point is not a constant
QDQ_SCALE_VALUE          error     Q/DQ scale is not positive and finite
QDQ_SCALE_SHAPE          error     scale neither scalar nor 1-D matching the input's ``axis`` dim
QDQ_PER_CHANNEL_ACTIVATION error   per-channel (or block) scale on an activation (only weights may have one)
DYNAMIC_NO_PROFILE       error     input with dynamic dims and no ``--input-shape name=min:opt:max``
PROFILE_MISMATCH         error     profile of the wrong rank, or changing a dim the model fixes
UNKNOWN_INPUT            error     ``--input-shape`` for a name that is not a graph input
OPSET                    error/warning opset older than 9 (error) or newer than the table (warning)
======================== ========= =====================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.backends.base import ShapeProfile, profile_problems

TABLE_VERSION = "TensorRT 10.x (onnx-tensorrt release/10.x docs/operators.md, as of 10.8)"
MIN_OPSET = 9
MAX_OPSET = 22

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    node: str  # node name (or input/tensor name for graph-level findings)
    op: str  # op type, or "(input)", "(tensor)", "(model)"
    message: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


#: Ops TensorRT 10's ONNX parser supports (onnx-tensorrt operators.md, "Supported: Y").
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow Cast CastLike
Ceil Celu Clip Compress Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND
Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization
HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If InstanceNormalization IsInf IsNaN LRN LSTM
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow
QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RoiAlign Round Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split())

#: Ops the table lists as not supported ("Supported: N").
UNSUPPORTED_OPS = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor CenterCropPad Col2Im ConcatFromSequence
ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial
NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch STFT
SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap
SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())

#: TopK's K limit in TensorRT (ITopKLayer).
TOPK_MAX_K = 3840

_UNSUPPORTED_TYPES = {
    TensorProto.STRING: "STRING", TensorProto.COMPLEX64: "COMPLEX64", TensorProto.COMPLEX128: "COMPLEX128",
    TensorProto.UINT16: "UINT16", TensorProto.UINT32: "UINT32", TensorProto.UINT64: "UINT64",
    TensorProto.INT16: "INT16",
}
_QDQ_ANY = {TensorProto.INT8: "INT8", TensorProto.FLOAT8E4M3FN: "FLOAT8E4M3FN"}
_QDQ_WEIGHTS_ONLY = {TensorProto.INT4: "INT4"}
if hasattr(TensorProto, "FLOAT4E2M1"):
    _QDQ_WEIGHTS_ONLY[TensorProto.FLOAT4E2M1] = "FLOAT4E2M1"

_INT32 = np.iinfo(np.int32)


class _Model:
    """Read-only indexes over a model: producers, consumers, constants, inferred types and shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnxopt.shapes import infer_shapes, value_shapes, value_types

        try:
            inferred = infer_shapes(model, strict=False)
        except Exception:  # noqa: BLE001 - a model shape inference cannot handle is still checked, with less detail
            inferred = model
        self.model = model
        self.types = value_types(inferred)
        self.shapes = value_shapes(inferred)
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def is_const(self, name: str) -> bool:
        if name in self.inits:
            return True
        p = self.producer.get(name)
        return p is not None and p.op_type == "Constant"

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.producer.get(name)
        if p is None or p.op_type != "Constant":
            return None
        for a in p.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                return np.asarray(helper.get_attribute_value(a))
        return None


def _label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# -- per-op restrictions (operators.md "Restrictions" column, selected) ----------------------------------------------

def _pool(node, m: _Model, attrs) -> list[str]:
    out = []
    if any(d != 1 for d in attrs.get("dilations", [])) and node.op_type != "MaxPool":
        out.append("dilations must be empty or all ones")
    if len(attrs.get("kernel_shape", [])) > 3:
        out.append("only 1D, 2D and 3D pooling")
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        out.append("the Indices output is not supported")
    return out


def _conv(node, m: _Model, attrs) -> list[str]:
    return ["only 1D, 2D and 3D convolutions"] if len(attrs.get("kernel_shape", [])) > 3 else []


def _resize(node, m: _Model, attrs) -> list[str]:
    out = []
    ctm = attrs.get("coordinate_transformation_mode", b"half_pixel")
    if (ctm.decode() if isinstance(ctm, bytes) else ctm) == "tf_crop_and_resize":
        out.append("coordinate_transformation_mode 'tf_crop_and_resize' is not supported")
    if attrs.get("antialias", 0):
        out.append("antialias=1 is not supported")
    policy = attrs.get("keep_aspect_ratio_policy", b"stretch")
    if (policy.decode() if isinstance(policy, bytes) else policy) != "stretch":
        out.append("keep_aspect_ratio_policy other than 'stretch' is not supported")
    return out


def _dropout(node, m: _Model, attrs) -> list[str]:
    if len(node.input) > 2 and node.input[2]:
        v = m.const(node.input[2])
        if v is None or bool(np.asarray(v).reshape(-1)[0]):
            return ["training_mode must be a constant False"]
    return []


def _batchnorm(node, m: _Model, attrs) -> list[str]:
    return ["training_mode=1 is not supported"] if attrs.get("training_mode", 0) else []


def _constant(node, m: _Model, attrs) -> list[str]:
    bad = [k for k in ("sparse_value", "value_string", "value_strings") if k in attrs]
    return [f"attribute {bad[0]!r} is not supported"] if bad else []


def _einsum(node, m: _Model, attrs) -> list[str]:
    eq = attrs.get("equation", b"")
    eq = eq.decode() if isinstance(eq, bytes) else eq
    return ["ellipsis ('...') in the equation is not supported"] if "..." in eq else []


def _topk(node, m: _Model, attrs) -> list[str]:
    k = m.const(node.input[1]) if len(node.input) > 1 else None
    if k is not None and int(np.asarray(k).reshape(-1)[0]) > TOPK_MAX_K:
        return [f"K={int(np.asarray(k).reshape(-1)[0])} exceeds TensorRT's limit of {TOPK_MAX_K}"]
    return []


_RESTRICTIONS: dict[str, Callable[[onnx.NodeProto, _Model, dict], list[str]]] = {
    "AveragePool": _pool, "MaxPool": _pool, "LpPool": _pool, "Conv": _conv, "ConvTranspose": _conv,
    "Resize": _resize, "Dropout": _dropout, "BatchNormalization": _batchnorm, "Constant": _constant,
    "Einsum": _einsum, "TopK": _topk,
}


# -- Q/DQ ---------------------------------------------------------------------------------------------------------

def _is_weight(node: onnx.NodeProto, m: _Model) -> bool:
    """True when the quantized tensor is a constant: Q of a constant, DQ of a constant, or DQ(Q(constant))."""
    x = node.input[0]
    if m.is_const(x):
        return True
    if node.op_type == "DequantizeLinear":
        p = m.producer.get(x)
        return p is not None and p.op_type == "QuantizeLinear" and m.is_const(p.input[0])
    return False


def _check_qdq(node: onnx.NodeProto, label: str, m: _Model) -> list[Finding]:
    out: list[Finding] = []

    def add(code: str, msg: str) -> None:
        out.append(Finding(code, "error", label, node.op_type, msg))

    attrs = _attrs(node)
    weight = _is_weight(node, m)
    scale_name = node.input[1] if len(node.input) > 1 else ""
    zp_name = node.input[2] if len(node.input) > 2 else ""
    # quantized type: the zero point's, else Q's output / DQ's input as inferred
    qtype = m.types.get(zp_name) if zp_name else None
    if qtype is None:
        qtype = m.types.get(node.output[0] if node.op_type == "QuantizeLinear" else node.input[0])
    if qtype is not None and qtype not in _QDQ_ANY:
        tname = helper.tensor_dtype_to_string(qtype).replace("TensorProto.", "")
        if qtype in _QDQ_WEIGHTS_ONLY and not weight:
            add("QDQ_TYPE", f"{tname} quantization is supported for weights only; this quantizes an activation")
        elif qtype == TensorProto.INT32:
            add("QDQ_TYPE", "INT32 (quantized bias) is not supported: keep biases in float, TensorRT quantizes "
                            "only the Conv/MatMul inputs")
        elif qtype not in _QDQ_WEIGHTS_ONLY:
            add("QDQ_TYPE", f"quantized type {tname} is not supported (use INT8 or FP8 E4M3; "
                            "TensorRT has no UINT8 quantization)")
    if zp_name:
        zp = m.const(zp_name)
        if zp is None:
            add("QDQ_NONCONST", f"zero point {zp_name!r} must be a constant")
        elif np.any(np.asarray(zp, dtype=np.float64) != 0):
            add("QDQ_ZERO_POINT", f"zero point {zp_name!r} must be 0 (TensorRT quantization is symmetric); "
                                  f"got {np.unique(np.asarray(zp, dtype=np.float64))[:4].tolist()}")
    scale = m.const(scale_name) if scale_name else None
    if scale is None:
        add("QDQ_NONCONST", f"scale {scale_name!r} must be a constant")
        return out
    s = np.asarray(scale, dtype=np.float64)
    if not np.all(np.isfinite(s) & (s > 0)):
        add("QDQ_SCALE_VALUE", f"scale {scale_name!r} must be positive and finite")
    block = int(attrs.get("block_size", 0) or 0)
    per_tensor = s.ndim == 0 or s.size == 1 and s.ndim == 1
    if per_tensor:
        pass
    elif block:
        if not weight:
            add("QDQ_PER_CHANNEL_ACTIVATION", "block quantization is supported for weights only")
    elif s.ndim != 1:
        add("QDQ_SCALE_SHAPE", f"scale {scale_name!r} has shape {list(s.shape)}: must be a scalar (per-tensor) or "
                               "1-D (per-channel)")
    else:
        if not weight:
            add("QDQ_PER_CHANNEL_ACTIVATION", f"per-channel scale ({s.size} values) on an activation: TensorRT "
                                              "supports per-channel quantization for weights only")
        shape = m.shapes.get(node.input[0])
        if shape is not None and len(shape):
            axis = int(attrs.get("axis", 1))
            axis = axis + len(shape) if axis < 0 else axis
            if not 0 <= axis < len(shape):
                add("QDQ_SCALE_SHAPE", f"axis {attrs.get('axis', 1)} is out of range for a rank-{len(shape)} input")
            elif isinstance(shape[axis], int) and shape[axis] != s.size:
                add("QDQ_SCALE_SHAPE", f"per-channel scale has {s.size} values but input dim {attrs.get('axis', 1)} "
                                       f"is {shape[axis]}")
    if zp_name and (zp := m.const(zp_name)) is not None and (
            np.size(zp) != s.size or (not per_tensor and np.shape(zp) != s.shape)):
        add("QDQ_SCALE_SHAPE", f"zero point shape {list(np.asarray(zp).shape)} differs from scale shape {list(s.shape)}")
    return out


# -- the check ----------------------------------------------------------------------------------------------------

def check(model: onnx.ModelProto, profiles: dict[str, ShapeProfile] | None = None) -> list[Finding]:
    """All findings for ``model`` with the given input profiles (``--input-shape``), errors first."""
    from onnxopt.model import default_opset

    m = _Model(model)
    findings: list[Finding] = []
    opset = default_opset(model) or 0
    if opset < MIN_OPSET:
        findings.append(Finding("OPSET", "error", "(model)", "(model)",
                                f"opset {opset}: TensorRT's ONNX parser needs opset {MIN_OPSET} or newer"))
    elif opset > MAX_OPSET:
        findings.append(Finding("OPSET", "warning", "(model)", "(model)",
                                f"opset {opset} is newer than the table's ({MAX_OPSET}); check your TensorRT release"))

    for name, code, msg in profile_problems(model, profiles or {}):
        findings.append(Finding(code, "error", name, "(input)", msg))

    for i, node in enumerate(model.graph.node):
        label = _label(node, i)
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            findings.append(Finding("CUSTOM_OP", "error", label, f"{node.domain}.{op}",
                                    f"{node.domain}::{op} is not an ONNX operator; TensorRT parses it only with a "
                                    f"plugin registered as {op!r}"))
            continue
        if op in UNSUPPORTED_OPS:
            findings.append(Finding("UNSUPPORTED_OP", "error", label, op,
                                    f"{op} is not supported by TensorRT's ONNX parser ({TABLE_VERSION})"))
            continue
        if op not in SUPPORTED_OPS:
            findings.append(Finding("UNKNOWN_OP", "warning", label, op,
                                    f"{op} is not in the {TABLE_VERSION} operator table; check your release"))
            continue
        for msg in _RESTRICTIONS.get(op, lambda *a: [])(node, m, _attrs(node)):
            findings.append(Finding("UNSUPPORTED_ATTR", "error", label, op, msg))
        if op in ("QuantizeLinear", "DequantizeLinear"):
            findings.extend(_check_qdq(node, label, m))

    findings.extend(_type_findings(model, m))
    findings.sort(key=lambda f: f.severity != "error")
    return findings


def _type_findings(model: onnx.ModelProto, m: _Model) -> list[Finding]:
    out: list[Finding] = []
    g = model.graph
    io = [(vi.name, "(input)") for vi in g.input if vi.name not in m.inits] + [(vi.name, "(output)") for vi in g.output]
    for name, kind in io:
        t = m.types.get(name)
        if t in _UNSUPPORTED_TYPES or t == TensorProto.DOUBLE:
            out.append(Finding("UNSUPPORTED_TYPE", "error", name, kind,
                               f"graph {kind[1:-1]} of type {helper.tensor_dtype_to_string(t)}: not a TensorRT I/O type"))
    reported = {name for name, _ in io}
    int64_values = 0
    for i, node in enumerate(g.node):
        for name in node.output:
            t = m.types.get(name)
            if name and name not in reported and t in _UNSUPPORTED_TYPES:
                reported.add(name)
                out.append(Finding("UNSUPPORTED_TYPE", "error", _label(node, i), node.op_type,
                                   f"tensor {name!r} has type {helper.tensor_dtype_to_string(t)}, which TensorRT "
                                   "does not have"))
    for name, t in m.types.items():
        if t == TensorProto.INT64:
            int64_values += 1
        elif t == TensorProto.DOUBLE and name not in reported:
            reported.add(name)
            users = m.consumers.get(name, [])
            where = users[0] if users else m.producer.get(name)
            out.append(Finding("DOUBLE_CAST", "warning", (where.name or where.op_type) if where else name,
                               where.op_type if where else "(tensor)",
                               f"{name!r} is DOUBLE: TensorRT has no FP64 and computes it in FP32"))
    for name in list(m.inits) + [o for n in g.node if n.op_type == "Constant" for o in n.output]:
        if m.types.get(name) != TensorProto.INT64:
            continue
        v = m.const(name)
        if v is None or v.size == 0:
            continue
        users = m.consumers.get(name, [])
        # INT64 min/max as Slice starts/ends mean "to the end": TensorRT clamps them correctly
        if users and all(u.op_type == "Slice" for u in users):
            v = v[(v != np.iinfo(np.int64).max) & (v != np.iinfo(np.int64).min)]
        if v.size and (v.min() < _INT32.min or v.max() > _INT32.max):
            user = users[0] if users else None
            out.append(Finding("INT64_RANGE", "warning", (user.name or user.op_type) if user else name,
                               user.op_type if user else "(tensor)",
                               f"INT64 constant {name!r} has values outside the INT32 range; they are clamped where "
                               "TensorRT casts INT64 to INT32"))
    if int64_values:
        out.append(Finding("INT64_CAST", "warning", "(graph)", "(model)",
                           f"{int64_values} INT64 tensor(s) (shapes, indices): TensorRT computes INT64 in INT32 where "
                           "its layers lack INT64 support (all INT64 weights before TensorRT 10)"))
    return out


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def findings_table(findings: list[Finding]):
    from rich.table import Table

    from rich.markup import escape

    t = Table(show_header=True, header_style="bold", title="trt-check (TensorRT 10.x operator table)")
    for col in ("severity", "code", "node", "op", "message"):
        t.add_column(col, overflow="fold")
    for f in findings:
        sev = "[red]error[/red]" if f.severity == "error" else "[yellow]warning[/yellow]"
        t.add_row(sev, f.code, escape(f.node), escape(f.op), escape(f.message))
    return t


def summary(findings: list[Finding]) -> str:
    ne = len(errors(findings))
    nw = len(findings) - ne
    return f"{ne} error{'s' if ne != 1 else ''}, {nw} warning{'s' if nw != 1 else ''}"


__all__ = ["Finding", "check", "errors", "findings_table", "summary", "SUPPORTED_OPS", "UNSUPPORTED_OPS",
           "TABLE_VERSION"]
