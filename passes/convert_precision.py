"""convert-precision: run the graph in float16 (or bfloat16), keeping fragile ops and the I/O in float32.

The rules are in the docstring of :class:`ConvertPrecision` (shown by ``onnxopt passes convert-precision``).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxopt.errors import PreconditionError
from onnxopt.graphutil import const_value, constant_producer, is_constant, unique_name
from onnxopt.pass_base import Pass, PassContext, PassResult, option

DEFAULT_BLOCK_OPS = (
    "Exp", "Log", "Pow", "Softmax", "LogSoftmax",
    "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "CumSum",
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "LpNormalization", "MeanVarianceNormalization",
    "Range",
)

#: ops whose output type is given by an attribute, not by their inputs
_ATTR_TYPED = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "EyeLike", "Multinomial", "Bernoulli"}
#: ops that take their input in any precision and whose outputs are not float
_NEUTRAL = {"Shape", "Size"}
_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul"}
#: ops TensorRT moves Q/DQ across: the quantized region extends through them
_MOVEMENT = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Gather", "Concat",
             "Split", "MaxPool", "GlobalMaxPool", "Pad", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Resize"}

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_TINY = 2.0 ** -24  # smallest positive subnormal


@dataclass(frozen=True)
class ConvertPrecisionOptions:
    to: Literal["fp16", "bf16"] = option("fp16", help="Low precision to convert to: fp16 or bf16.")
    keep_io_types: bool = option(True, help="Keep float32 graph inputs/outputs (Casts at the boundary); false "
                                            "converts them too.")
    block_ops: tuple[str, ...] = option(DEFAULT_BLOCK_OPS, help="Op types kept in float32 (replaces the default "
                                                               "list; empty: none).")
    block_nodes: tuple[str, ...] = option((), help="Node names (fnmatch patterns) kept in float32.")
    out_of_range: Literal["clamp", "keep-fp32"] = option(
        "clamp", help="fp16 constants beyond +-65504 or below 2^-24: clamp them (warning in the stats) or keep the "
                      "reading op in float32.")


@dataclass
class _Slots:
    """Which input/output positions of a node are bound to converted float32 type variables."""

    inputs: set[int]
    outputs: set[int]


class ConvertPrecision(Pass):
    """Convert compute and weights to float16/bfloat16; float32 I/O, Casts only at float32 boundaries.

    TensorRT's strongly typed networks (and TensorRT 11, which drops the FP16 builder flag) take their precision from the
    graph's types, so FP16 deployment needs the graph itself in FP16. This pass converts weights and compute and places
    Cast nodes only where float32 and low-precision regions meet.

    How a node is assigned a precision:

    * A node runs in low precision when it computes on float32 tensors and none of the rules below keeps it in float32.
      Which of its inputs and outputs change type comes from the op's ONNX schema: the float32 tensors bound to a type
      variable (``T``) that also allows float16/bfloat16 are converted; fixed-type inputs stay float32 (Resize's
      ``scales`` is ``tensor(float)``), and so do integer inputs (shapes, indices, Resize ``sizes``).
    * Kept in float32: ops in ``block_ops`` (numerically fragile ops; the user can replace the list), nodes whose name
      matches ``block_nodes``, ops whose schema for this opset has no float16/bfloat16 variant, ops whose output type is set
      by an attribute (ConstantOfShape, Random*, EyeLike; Cast is converted by changing ``to``), ops with subgraphs and
      the producers of values their subgraphs read, custom-domain ops, nodes with inputs of unknown type, and the
      quantized parts of QDQ models: Q/DQ nodes (scales stay float32), the ops a DequantizeLinear feeds and the ops feeding
      a QuantizeLinear, looking through data-movement ops (Reshape, Transpose, MaxPool, ...).
    * Shape and Size take their input in whatever precision it has.

    Constants (initializers and Constant nodes) read in low precision get a converted copy (the float32 original stays for
    float32 readers, so no Cast is needed for them). With ``to=fp16``, values beyond the float16 range (|x| > 65504) and
    non-zero values that would flush to zero (|x| < 2^-24) are clamped to the nearest float16 value with a warning in the
    stats (``out_of_range=clamp``, the default), or the reading op is kept in float32 (``out_of_range=keep-fp32``).

    Default block list: Exp, Log, Pow, Softmax, LogSoftmax, the summing reductions (ReduceSum, ReduceSumSquare, ReduceL1,
    ReduceL2, ReduceLogSum, ReduceLogSumExp, ReduceProd, CumSum), the normalizations that compute statistics
    (LayerNormalization, GroupNormalization, InstanceNormalization, LpNormalization, MeanVarianceNormalization) and Range
    (its length is computed from float start/limit/delta). BatchNormalization is not blocked: at inference it is a
    per-channel scale and shift (fold it first with fold-bn; add it to ``block_ops`` to keep it in float32).

    ONNX Runtime's CPU provider runs float16 models (it computes ops without float16 kernels in float32), so results can be
    validated as usual. bfloat16 models generally do not run on ONNX Runtime's CPU provider: validate them on the target
    (or with --no-validate).

    Stats: ``converted_nodes``, ``converted_constants`` (low-precision copies made), ``casts_inserted``,
    ``io_converted`` (graph inputs/outputs retyped, keep_io_types=false), ``removed_constant_nodes`` (Constant nodes
    no longer read after conversion), ``kept_fp32_<reason>`` per node kept in float32 (``block_ops``, ``block_nodes``,
    ``qdq``, ``attr_typed``, ``subgraph``, ``custom_domain``, ``unknown_type``, ``no_fp16_type``/``no_bf16_type``,
    ``out_of_range``), ``warn_clamped_constants``/``warn_clamped_values`` (constants and values clamped into the fp16
    range), ``skipped_no_float32`` / ``skipped_nothing_to_convert`` when the graph is left unchanged, ``to``.
    """

    name = "convert-precision"
    Options = ConvertPrecisionOptions
    kind = "lossy"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if not ctx.opset:
            raise PreconditionError("the model imports no default-domain opset")

    # -- analysis ------------------------------------------------------------------------------------------------

    def _types(self, graph: gs.Graph, ctx: PassContext) -> dict[str, int]:
        from onnxopt.model import graph_skeleton
        from onnxopt.shapes import infer_shapes, value_types

        skeleton = graph_skeleton(graph, ctx.template)
        try:
            skeleton = infer_shapes(skeleton, strict=False)
        except Exception:  # noqa: BLE001 - nodes whose types stay unknown are kept in float32
            pass
        return value_types(skeleton)

    @staticmethod
    def _schema(node: gs.Node, opset: int):
        try:
            return onnx.defs.get_schema(node.op, opset, node.domain or "")
        except onnx.defs.SchemaError:
            return None

    @staticmethod
    def _bindings(schema, n_in: int, n_out: int) -> tuple[list[str | None], list[str | None]]:
        """The type variable (or None for a fixed type) of each actual input/output position."""
        variables = {c.type_param_str for c in schema.type_constraints}

        def bind(params, n):
            out = []
            for i in range(n):
                if i < len(params):
                    p = params[i]
                elif params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
                    p = params[-1]
                else:
                    out.append(None)
                    continue
                out.append(p.type_str if p.type_str in variables else None)
            return out

        return bind(schema.inputs, n_in), bind(schema.outputs, n_out)

    def _qdq_region(self, nodes: list[gs.Node]) -> set[int]:
        """ids of nodes in quantized parts: Q/DQ, what a DQ feeds and what feeds a Q (through data movement)."""
        keep = {id(n) for n in nodes if n.op in _QDQ}
        fwd: set[int] = set()
        for n in nodes:
            if n.op in _QDQ:
                continue
            for t in n.inputs:
                p = t.inputs[0] if len(t.inputs) == 1 else None
                if p is not None and (p.op == "DequantizeLinear" or (id(p) in fwd and p.op in _MOVEMENT)):
                    fwd.add(id(n))
                    break
        bwd: set[int] = set()
        for n in reversed(nodes):
            if n.op in _QDQ:
                continue
            if any(c.op == "QuantizeLinear" or (id(c) in bwd and c.op in _MOVEMENT) for t in n.outputs for c in t.outputs):
                bwd.add(id(n))
        return keep | fwd | bwd

    @staticmethod
    def _subgraph_reads(graph: gs.Graph) -> set[str]:
        """Names of outer values read inside subgraphs (If/Loop/Scan bodies)."""
        names: set[str] = set()

        def visit(g: gs.Graph) -> None:
            for n in g.nodes:
                for v in n.attrs.values():
                    subs = [v] if isinstance(v, gs.Graph) else [x for x in v if isinstance(x, gs.Graph)] if isinstance(v, list) else []
                    for sg in subs:
                        local = {t.name for t in sg.inputs} | {t.name for sn in sg.nodes for t in sn.outputs}
                        names.update(t.name for sn in sg.nodes for t in sn.inputs
                                     if t.name and t.name not in local and not isinstance(t, gs.Constant))
                        visit(sg)

        visit(graph)
        return names

    def _out_of_range(self, values: np.ndarray) -> np.ndarray:
        a = np.abs(values.astype(np.float64))
        return np.isfinite(a) & ((a > FP16_MAX) | ((a > 0) & (a < FP16_TINY)))

    # -- the pass ------------------------------------------------------------------------------------------------

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        low_type = TensorProto.FLOAT16 if o.to == "fp16" else TensorProto.BFLOAT16
        low_np = onnx.helper.tensor_dtype_to_np_dtype(low_type)
        low_str = "tensor(float16)" if o.to == "fp16" else "tensor(bfloat16)"
        opset = int(ctx.opset or 0)
        types = self._types(graph, ctx)
        F = TensorProto.FLOAT
        stats: dict[str, int | str] = defaultdict(int)
        nodes = list(graph.nodes)

        if not any(t == F for t in types.values()):
            return PassResult(False, {"skipped_no_float32": 1})

        def is_f32(t: gs.Tensor) -> bool:
            return bool(t.name) and types.get(t.name) == F

        qdq = self._qdq_region(nodes)
        sub_reads = self._subgraph_reads(graph)
        blocked_ops = set(o.block_ops)

        # 1. decide each node's precision
        low: dict[int, _Slots] = {}
        for n in nodes:
            ins = [t for t in n.inputs if t.name]
            outs = [t for t in n.outputs if t.name]
            if n.op in _NEUTRAL or not any(is_f32(t) for t in ins + outs):
                continue
            reason = None
            schema = self._schema(n, opset)
            if (n.domain or "") not in ("", "ai.onnx"):
                reason = "custom_domain"
            elif n.op in blocked_ops:
                reason = "block_ops"
            elif any(fnmatch.fnmatchcase(n.name or "", pat) for pat in o.block_nodes):
                reason = "block_nodes"
            elif id(n) in qdq:
                reason = "qdq"
            elif n.op in _ATTR_TYPED:
                reason = "attr_typed"
            elif any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(v[0], gs.Graph))
                     for v in n.attrs.values()) or any(t.name in sub_reads for t in outs):
                reason = "subgraph"
            elif schema is None or any(types.get(t.name) is None for t in ins + outs):
                reason = "unknown_type"
            if reason is None:
                in_vars, out_vars = self._bindings(schema, len(n.inputs), len(n.outputs))
                f32_vars = {v for t, v in zip(n.inputs, in_vars) if v and is_f32(t)}
                f32_vars |= {v for t, v in zip(n.outputs, out_vars) if v and is_f32(t)}
                allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
                if not f32_vars:
                    continue  # float32 only in fixed-type slots (e.g. Resize scales from a float32 producer)
                if any(low_str not in allowed[v] for v in f32_vars):
                    reason = "no_" + o.to + "_type"
                else:
                    slots = _Slots({i for i, (t, v) in enumerate(zip(n.inputs, in_vars)) if v in f32_vars and t.name},
                                   {i for i, (t, v) in enumerate(zip(n.outputs, out_vars)) if v in f32_vars and t.name})
                    if o.to == "fp16" and o.out_of_range == "keep-fp32" and any(
                            is_constant(n.inputs[i]) and (v := const_value(n.inputs[i])) is not None
                            and np.any(self._out_of_range(v)) for i in slots.inputs):
                        reason = "out_of_range"
                    else:
                        low[id(n)] = slots
            if reason is not None:
                stats[f"kept_fp32_{reason}"] += 1

        # 2. the precision of every float32 value after the rewrite: low when a low node makes it
        low_values: set[str] = set()
        for n in nodes:
            slots = low.get(id(n))
            if slots:
                low_values.update(n.outputs[i].name for i in slots.outputs)
        in_names = {t.name for t in graph.inputs}
        if not o.keep_io_types:
            low_values.update(t.name for t in graph.inputs if is_f32(t))

        if not low and o.keep_io_types:
            stats["skipped_nothing_to_convert"] = 1
            return PassResult(False, dict(stats))

        taken = set(graph.tensors().keys()) | {n.name for n in nodes}
        casts_after: dict[int | None, list[gs.Node]] = defaultdict(list)  # producer id (None: graph start)
        cast_cache: dict[tuple[str, int], gs.Variable] = {}
        const_cache: dict[str, gs.Constant] = {}
        touched_constant_nodes: list[gs.Node] = []

        def add_cast(t: gs.Tensor, to: int, out: gs.Variable | None = None) -> gs.Variable:
            key = (t.name, to)
            if key in cast_cache:
                return cast_cache[key]
            suffix = {F: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}[to]
            if out is None:
                out = gs.Variable(unique_name(graph, f"{t.name}_{suffix}", taken),
                                  dtype=onnx.helper.tensor_dtype_to_np_dtype(to), shape=t.shape)
            node = gs.Node("Cast", name=unique_name(graph, f"{t.name}_to_{suffix}", taken), attrs={"to": to},
                           inputs=[t], outputs=[out])
            p = t.inputs[0] if len(t.inputs) == 1 else None
            casts_after[id(p) if p is not None else None].append(node)
            cast_cache[key] = out
            stats["casts_inserted"] += 1
            return out

        def low_constant(t: gs.Tensor) -> gs.Constant:
            if t.name in const_cache:
                return const_cache[t.name]
            values = np.asarray(const_value(t), dtype=np.float32)
            if o.to == "fp16":
                bad = self._out_of_range(values)
                if bad.any():
                    stats["warn_clamped_constants"] += 1
                    stats["warn_clamped_values"] += int(bad.sum())
                    values = np.where(np.abs(values) > FP16_MAX, np.sign(values) * FP16_MAX,
                                      np.where(bad, np.sign(values) * FP16_TINY, values))
            c = gs.Constant(unique_name(graph, f"{t.name}_{o.to}", taken), np.array(values, dtype=low_np, order="C"))
            const_cache[t.name] = c
            stats["converted_constants"] += 1
            p = constant_producer(t)
            if p is not None:
                touched_constant_nodes.append(p)
            return c

        # 3. graph outputs whose precision must differ from their producer's: rename + Cast back
        for out_t in list(graph.outputs):
            if not is_f32(out_t) or out_t.name in in_names or isinstance(out_t, gs.Constant):
                continue
            want_low = not o.keep_io_types
            if (out_t.name in low_values) == want_low:
                if want_low:
                    out_t.dtype = low_np
                    stats["io_converted"] += 1
                continue
            p = out_t.inputs[0]
            inner = gs.Variable(unique_name(graph, f"{out_t.name}_{o.to if not want_low else 'fp32'}", taken),
                                dtype=np.float32 if want_low else low_np, shape=out_t.shape)
            p.outputs[p.outputs.index(out_t)] = inner
            for c in list(out_t.outputs):
                for j, x in enumerate(list(c.inputs)):
                    if x is out_t:
                        c.inputs[j] = inner
            types[inner.name] = F
            if not want_low:
                low_values.add(inner.name)
            low_values.discard(out_t.name)
            add_cast(inner, low_type if want_low else F, out=out_t)
            out_t.dtype = low_np if want_low else np.float32
            if want_low:
                stats["io_converted"] += 1

        if not o.keep_io_types:
            for t in graph.inputs:
                if is_f32(t):
                    t.dtype = low_np
                    stats["io_converted"] += 1

        # 4. rewire inputs: converted constants, Casts where precisions meet; retype low outputs
        for n in nodes:
            if n.op in _NEUTRAL:
                continue
            slots = low.get(id(n))
            want = slots.inputs if slots else set()
            for i, t in enumerate(list(n.inputs)):
                if not is_f32(t):
                    continue
                if is_constant(t):
                    if i in want:
                        n.inputs[i] = low_constant(t)
                    continue
                is_low = t.name in low_values
                if i in want and not is_low:
                    n.inputs[i] = add_cast(t, low_type)
                elif i not in want and is_low:
                    n.inputs[i] = add_cast(t, F)
            if slots:
                stats["converted_nodes"] += 1
                for i in slots.outputs:
                    if n.outputs[i].name in low_values:
                        n.outputs[i].dtype = low_np
                if n.op == "Cast" and n.attrs.get("to") == F and 0 in slots.outputs:
                    n.attrs["to"] = low_type

        # 5. node order: each Cast right after the producer of its input; drop Constant nodes no longer read
        outputs = {t.name for t in graph.outputs}
        dead = {id(p) for p in touched_constant_nodes
                if all(not t.outputs and t.name not in outputs for t in p.outputs)}
        ordered = list(casts_after.get(None, []))
        for n in nodes:
            if id(n) in dead:
                continue
            ordered.append(n)
            ordered.extend(casts_after.get(id(n), []))
        for n in nodes:
            if id(n) in dead:
                for t in n.outputs:
                    t.inputs.clear()
        graph.nodes = ordered
        stats["removed_constant_nodes"] = len(dead)
        changed = any(stats[k] for k in ("converted_nodes", "casts_inserted", "io_converted", "converted_constants"))
        if not changed:
            stats["skipped_nothing_to_convert"] = 1
        stats["to"] = o.to
        return PassResult(changed, {k: v for k, v in stats.items() if v or k == "converted_nodes"})
