"""``fold-bn``: fold inference-mode BatchNormalization into a neighbouring linear op."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graphutil import const_value, constant_producer, producer, unique_name
from onnxopt.pass_base import Pass, PassContext, PassResult, option

#: Producer op -> stat suffix of a backward fold.
_PRODUCERS = {"Conv": "conv", "ConvTranspose": "conv_transpose", "Gemm": "gemm", "MatMul": "matmul"}


@dataclass(frozen=True)
class FoldBatchNormOptions:
    standalone: Literal["keep", "mul-add"] = option(
        "keep",
        help="What to do with a BN that folds nowhere exactly: keep it, or rewrite it as a per-channel Mul+Add.",
    )


class _Skip(Exception):
    """A BN (or one way of folding it) does not apply; ``reason`` is the stat key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _is_default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


_CHUNK_ELEMENTS = 1 << 15  # float64 temporaries of 256 KiB stay in cache: ~2x faster than one whole-array multiply


def _scaled(w: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``w * factor`` computed in float64 and stored in ``w``'s dtype, without a float64 copy of ``w`` (in chunks along
    axis 0 so that numpy's float64 temporaries stay small)."""
    out = np.empty(w.shape, dtype=w.dtype)
    if w.ndim == 0 or factor.ndim != w.ndim:
        np.multiply(w, factor, out=out, dtype=np.float64, casting="unsafe")
        return out
    step = max(1, _CHUNK_ELEMENTS // max(1, w[0].size))
    per_row = factor.shape[0] == w.shape[0] and w.shape[0] > 1
    for i in range(0, w.shape[0], step):
        f = factor[i:i + step] if per_row else factor
        np.multiply(w[i:i + step], f, out=out[i:i + step], dtype=np.float64, casting="unsafe")
    return out


class _Run:
    """State of one run of the pass over one graph (the pass itself keeps none)."""

    def __init__(self, graph: gs.Graph, options: FoldBatchNormOptions) -> None:
        self.graph = graph
        self.options = options
        self.outputs = {t.name for t in graph.outputs}
        self.inputs = {t.name for t in graph.inputs}
        self.stats: Counter[str] = Counter()
        self.changed = False
        self._taken: set[str] | None = None
        self._removed: set[int] = set()
        self._replaced: dict[int, list[gs.Node]] = {}
        self._types: dict[str, tuple[int | None, int]] | None = None

    # -- bookkeeping ------------------------------------------------------------------------------------------------
    def _name(self, base: str) -> str:
        if self._taken is None:
            self._taken = set(self.graph.tensors().keys()) | {n.name for n in self.graph.nodes}
        return unique_name(self.graph, base, self._taken)

    def _remove(self, node: gs.Node) -> None:
        node.inputs.clear()
        node.outputs.clear()
        self._removed.add(id(node))

    def _drop_dead_constant(self, tensor: gs.Tensor) -> None:
        node = constant_producer(tensor)
        if node is not None and not tensor.outputs and tensor.name not in self.outputs:
            self._remove(node)

    def flush(self) -> None:
        """Apply pending node removals/replacements to ``graph.nodes`` (one rebuild, order kept)."""
        if not self._removed and not self._replaced:
            return
        nodes: list[gs.Node] = []
        for n in self.graph.nodes:
            if id(n) in self._replaced:
                nodes.extend(self._replaced[id(n)])
            elif id(n) not in self._removed:
                nodes.append(n)
        self.graph.nodes = nodes
        self._removed.clear()
        self._replaced.clear()

    def _inferred(self) -> dict[str, tuple[int | None, int]]:
        """name -> (onnx elem type, rank) from ONNX shape inference, computed once and only when needed."""
        if self._types is None:
            from onnx import TensorProto

            from onnxopt.model import graph_to_model
            from onnxopt.shapes import infer_shapes

            self.flush()
            self._types = {}
            try:
                model = infer_shapes(graph_to_model(self.graph))
            except Exception:  # noqa: BLE001 - inference is a best-effort source of ranks; unknown stays unknown
                return self._types
            g = model.graph
            for vi in list(g.input) + list(g.value_info) + list(g.output):
                tt = vi.type.tensor_type
                if vi.type.HasField("tensor_type") and tt.HasField("shape"):
                    etype = tt.elem_type if tt.elem_type != TensorProto.UNDEFINED else None
                    self._types[vi.name] = (etype, len(tt.shape.dim))
        return self._types

    def rank(self, *tensors: gs.Tensor) -> int | None:
        """Rank of the first tensor in ``tensors`` whose rank is known (they must share a rank)."""
        for t in tensors:
            if t.shape is not None:
                return len(t.shape)
        for t in tensors:
            if t.name in self._inferred():
                return self._inferred()[t.name][1]
        return None

    def dtype(self, *tensors: gs.Tensor) -> np.dtype | None:
        """Element type of the first tensor in ``tensors`` whose type is known (they must share a type)."""
        for t in tensors:
            if t.dtype is not None:
                try:
                    return np.dtype(t.dtype)
                except TypeError:
                    return None
        from onnx.helper import tensor_dtype_to_np_dtype

        for t in tensors:
            info = self._inferred().get(t.name)
            if info is not None and info[0] is not None:
                return np.dtype(tensor_dtype_to_np_dtype(info[0]))
        return None

    def _users(self, tensor: gs.Tensor) -> int:
        return len(tensor.outputs) + (tensor.name in self.outputs)

    def _weight(self, node: gs.Node, idx: int, *, optional: bool = False) -> np.ndarray | None:
        """The constant, unshared input ``idx`` of ``node`` (None when an optional input is absent)."""
        if idx >= len(node.inputs) or not node.inputs[idx].name:
            if optional:
                return None
            raise _Skip("skipped_non_constant_producer_weight")
        t = node.inputs[idx]
        value = const_value(t) if t.name not in self.inputs else None
        if value is None:
            raise _Skip("skipped_non_constant_producer_weight")
        if self._users(t) > 1:
            raise _Skip("skipped_shared_weight")
        return value

    def _set_input(self, node: gs.Node, idx: int, value: np.ndarray, base: str) -> None:
        """Give ``node`` a new initializer at input ``idx`` (keeping the old tensor's name when there is one)."""
        old = node.inputs[idx] if idx < len(node.inputs) else None
        if old is not None and old.name:
            name = old.name
            cnode = constant_producer(old)
            if cnode is not None:  # a Constant node's output: the node goes, an initializer takes its place
                self._remove(cnode)
        else:
            name = self._name(base)
        new = gs.Constant(name, np.ascontiguousarray(value))
        if idx < len(node.inputs):
            node.inputs[idx] = new
        else:
            node.inputs.append(new)

    # -- BatchNormalization -----------------------------------------------------------------------------------------
    def bn_factors(self, bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (scale, shift) in float64 with BN(x) = x * scale + shift, or _Skip."""
        if int(bn.attrs.get("training_mode", 0)) == 1:
            raise _Skip("skipped_training_mode")
        if any(t.name for t in bn.outputs[1:]):
            # Before opset 14 the optional outputs (running/saved statistics) are what selects training mode, used
            # or not (ONNX Runtime then normalizes with the batch statistics); from 14 they are training-only.
            raise _Skip("skipped_training_mode")
        if len(bn.inputs) != 5:
            raise _Skip("skipped_non_constant_params")
        params = []
        for t in bn.inputs[1:]:
            v = const_value(t) if t.name and t.name not in self.inputs else None
            if v is None:
                raise _Skip("skipped_non_constant_params")
            params.append(np.asarray(v, dtype=np.float64))
        scale, bias, mean, var = params
        c = scale.size
        if any(p.ndim != 1 or p.size != c for p in params):
            raise _Skip("skipped_non_per_channel_params")
        if int(bn.attrs.get("spatial", 1)) == 0 and self.rank(bn.inputs[0], bn.outputs[0]) != 2:
            # opset 7/8 per-activation statistics: per-channel only when the input is [N, C]
            raise _Skip("skipped_non_per_channel_params")
        eps = float(bn.attrs.get("epsilon", 1e-5))
        s = scale / np.sqrt(var + eps)
        return s, bias - mean * s

    def process(self, bn: gs.Node) -> None:
        self.stats["bn_total"] += 1
        try:
            s, t = self.bn_factors(bn)
        except _Skip as e:
            self.stats[e.reason] += 1
            return
        reason = None
        try:
            if self.fold_backward(bn, s, t):
                return
        except _Skip as e:
            reason = e.reason
        try:
            if self.fold_forward(bn, s, t):
                self.stats["folded_forward"] += 1
                return
        except _Skip as e:
            reason = reason or e.reason
        if self.options.standalone == "mul-add":
            try:
                self.rewrite_mul_add(bn, s, t)
                self.stats["rewritten_mul_add"] += 1
                return
            except _Skip as e:
                reason = reason or e.reason
        self.stats[reason or "skipped_no_exact_target"] += 1

    def _remove_bn(self, bn: gs.Node) -> None:
        params = list(bn.inputs[1:])
        self._remove(bn)
        for p in params:
            self._drop_dead_constant(p)
        self.changed = True

    # -- backward: into the producer --------------------------------------------------------------------------------
    def fold_backward(self, bn: gs.Node, s: np.ndarray, t: np.ndarray) -> bool:
        x, y = bn.inputs[0], bn.outputs[0]
        p = producer(x)
        if p is None or p.op not in _PRODUCERS or not _is_default_domain(p) or not p.outputs or p.outputs[0] is not x:
            return False
        if x.name in self.outputs:
            raise _Skip("skipped_producer_output_is_graph_output")
        if len(x.outputs) != 1:
            raise _Skip("skipped_producer_output_used_elsewhere")
        c = s.size
        kind = _PRODUCERS[p.op]
        base = f"{p.name or x.name}_bias"
        if p.op in ("Conv", "ConvTranspose"):
            w = self._weight(p, 1)
            b = self._weight(p, 2, optional=True)
            if w.ndim < 3:
                raise _Skip("skipped_channel_mismatch")
            if p.op == "Conv":
                if w.shape[0] != c:
                    raise _Skip("skipped_channel_mismatch")
                factor = s.reshape((c,) + (1,) * (w.ndim - 1))
            else:  # ConvTranspose weight: (C_in, C_out / group, k...); output channel = group index * C_out/g + j
                g = int(p.attrs.get("group", 1))
                cin, cout_g = w.shape[0], w.shape[1]
                if cout_g * g != c or cin % g:
                    raise _Skip("skipped_channel_mismatch")
                idx = (np.arange(cin) // (cin // g))[:, None] * cout_g + np.arange(cout_g)[None, :]
                factor = s[idx].reshape((cin, cout_g) + (1,) * (w.ndim - 2))
            if b is not None and b.size != c:
                raise _Skip("skipped_channel_mismatch")
            new_w = _scaled(w, factor)
            b64 = b.astype(np.float64).reshape(c) if b is not None else 0.0
            new_b = (b64 * s + t).astype(w.dtype)
            self._set_input(p, 1, new_w, base)
            self._set_input(p, 2, new_b, base)
        elif p.op == "Gemm":
            w = self._weight(p, 1)
            bias = self._weight(p, 2, optional=True)
            trans_b = int(p.attrs.get("transB", 0))
            if w.ndim != 2 or w.shape[0 if trans_b else 1] != c:
                raise _Skip("skipped_channel_mismatch")
            beta = float(p.attrs.get("beta", 1.0))
            new_w = _scaled(w, s[:, None] if trans_b else s[None, :])
            c64 = beta * bias.astype(np.float64) if bias is not None else 0.0
            try:
                new_c = (c64 * s + t).astype(w.dtype)
            except ValueError:  # C not broadcastable to the output's last axis
                raise _Skip("skipped_channel_mismatch") from None
            self._set_input(p, 1, new_w, base)
            self._set_input(p, 2, new_c, base)
            if beta != 1.0:
                p.attrs["beta"] = 1.0
        else:  # MatMul(A, W) with a constant 2-D W and a 2-D A: becomes Gemm(A, W * s, t)
            w = self._weight(p, 1)
            if w.ndim != 2 or self.rank(x, p.inputs[0]) != 2:
                # BN normalizes axis 1, a MatMul's features are on its last axis: the same axis only at rank 2
                raise _Skip("skipped_matmul_not_2d")
            if w.shape[1] != c:
                raise _Skip("skipped_channel_mismatch")
            self._set_input(p, 1, _scaled(w, s[None, :]), base)
            self._set_input(p, 2, t.astype(w.dtype), base)
            p.op = "Gemm"
            p.attrs = {}
        self._remove_bn(bn)
        p.outputs[0] = y  # the producer takes over the BN's output tensor (name, type, shape, graph-output role)
        self.stats[f"folded_into_{kind}"] += 1
        return True

    # -- forward: into a following Conv/Gemm ------------------------------------------------------------------------
    def fold_forward(self, bn: gs.Node, s: np.ndarray, t: np.ndarray) -> bool:
        """Fold BN(x) = x*s + t into the Conv/Gemm its output reaches through per-channel-affine-preserving ops.

        Flatten (axis 1) and GlobalAveragePool commute with a per-channel affine map; MaxPool/GlobalMaxPool do when
        every scale is positive. Every tensor on the way must have that single consumer and not be a graph output.
        Returns False when there is no such path; raises _Skip when a target was found but is blocked.
        """
        x, cur = bn.inputs[0], bn.outputs[0]
        positive = bool(np.all(s > 0))
        flattened = False
        first = None
        while True:
            if cur.name in self.outputs or len(cur.outputs) != 1:
                return False
            n = cur.outputs[0]
            if not _is_default_domain(n) or not n.inputs or n.inputs[0] is not cur or not n.outputs:
                return False
            if first is None:
                first = n
            if n.op == "Gemm":
                self._forward_gemm(n, s, t, flattened)
                break
            if n.op == "Conv" and not flattened:
                self._forward_conv(n, s, t)
                break
            if n.op == "Flatten" and not flattened and int(n.attrs.get("axis", 1)) == 1:
                flattened = True
            elif n.op == "GlobalAveragePool" and not flattened:
                pass
            elif (n.op in ("MaxPool", "GlobalMaxPool") and not flattened and positive
                  and not any(o.name and self._users(o) for o in n.outputs[1:])):
                pass
            else:
                return False
            cur = n.outputs[0]
        first.inputs[0] = x  # the path now starts from the BN's input
        self._remove_bn(bn)
        return True

    def _forward_gemm(self, n: gs.Node, s: np.ndarray, t: np.ndarray, flattened: bool) -> None:
        # Gemm(A*s_f + t_f, B) = Gemm(A, diag(s_f) B) + alpha * t_f B, with s_f, t_f per input feature
        if int(n.attrs.get("transA", 0)):
            raise _Skip("skipped_no_exact_target")
        w = self._weight(n, 1)
        bias = self._weight(n, 2, optional=True)
        trans_b = int(n.attrs.get("transB", 0))
        if w.ndim != 2:
            raise _Skip("skipped_channel_mismatch")
        k, c = (w.shape[1] if trans_b else w.shape[0]), s.size
        if k % c or (not flattened and k != c):
            raise _Skip("skipped_channel_mismatch")
        hw = k // c  # Flatten of [N, C, *spatial] puts channel c at features c*hw ... (c+1)*hw - 1
        s_f, t_f = np.repeat(s, hw), np.repeat(t, hw)
        alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
        b_mat = (w.T if trans_b else w).astype(np.float64)  # (K, N)
        c64 = beta * bias.astype(np.float64) if bias is not None else 0.0
        try:
            new_c = (c64 + alpha * (t_f @ b_mat)).astype(w.dtype)
        except ValueError:
            raise _Skip("skipped_channel_mismatch") from None
        base = f"{n.name or n.outputs[0].name}_bias"
        self._set_input(n, 1, _scaled(w, s_f[None, :] if trans_b else s_f[:, None]), base)
        self._set_input(n, 2, new_c, base)
        if beta != 1.0:
            n.attrs["beta"] = 1.0

    def _forward_conv(self, n: gs.Node, s: np.ndarray, t: np.ndarray) -> None:
        # Only without padding: padded zeros are not shifted by t, so a padded conv would see a different border.
        auto_pad = n.attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        pads = n.attrs.get("pads") or ()
        if auto_pad not in ("NOTSET", "VALID") or (auto_pad == "NOTSET" and any(int(p) for p in pads)):
            raise _Skip("skipped_no_exact_target")
        w = self._weight(n, 1)
        b = self._weight(n, 2, optional=True)
        g = int(n.attrs.get("group", 1))
        if w.ndim < 3:
            raise _Skip("skipped_channel_mismatch")
        m, cg = w.shape[0], w.shape[1]
        if cg * g != s.size or m % g or (b is not None and b.size != m):
            raise _Skip("skipped_channel_mismatch")
        idx = (np.arange(m) // (m // g))[:, None] * cg + np.arange(cg)[None, :]  # input channel of W[o, ci]
        s_w, t_w = s[idx], t[idx]
        new_w = _scaled(w, s_w.reshape(s_w.shape + (1,) * (w.ndim - 2)))
        shift = (w.astype(np.float64).reshape(m, cg, -1).sum(axis=2) * t_w).sum(axis=1)
        b64 = b.astype(np.float64).reshape(m) if b is not None else 0.0
        base = f"{n.name or n.outputs[0].name}_bias"
        self._set_input(n, 1, new_w, base)
        self._set_input(n, 2, (b64 + shift).astype(w.dtype), base)

    # -- standalone: Mul + Add --------------------------------------------------------------------------------------
    def rewrite_mul_add(self, bn: gs.Node, s: np.ndarray, t: np.ndarray) -> None:
        x, y = bn.inputs[0], bn.outputs[0]
        rank = self.rank(x, y)
        dtype = self.dtype(x, y)
        if rank is None or rank < 2:
            raise _Skip("skipped_unknown_rank")
        if dtype is None or dtype.kind != "f":
            raise _Skip("skipped_unknown_dtype")
        shape = (s.size,) + (1,) * (rank - 2)  # broadcasts over [N, C, *spatial]
        base = bn.name or y.name
        scale = gs.Constant(self._name(f"{base}_scale"), s.astype(dtype).reshape(shape))
        shift = gs.Constant(self._name(f"{base}_shift"), t.astype(dtype).reshape(shape))
        mid = gs.Variable(self._name(f"{base}_scaled"), dtype=dtype, shape=x.shape if x.shape is not None else y.shape)
        params = list(bn.inputs[1:])
        bn.inputs.clear()
        bn.outputs.clear()
        mul = gs.Node("Mul", self._name(f"{base}_mul"), inputs=[x, scale], outputs=[mid])
        add = gs.Node("Add", self._name(f"{base}_add"), inputs=[mid, shift], outputs=[y])
        self._replaced[id(bn)] = [mul, add]
        for p in params:
            self._drop_dead_constant(p)
        self.changed = True


class FoldBatchNorm(Pass):
    """Fold inference-mode BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul.

    W' = W * gamma / sqrt(var + eps);  b' = (b - mean) * gamma / sqrt(var + eps) + beta, computed in float64 and stored
    in the weight's dtype. A BN without a foldable producer is folded forward into a following Conv (unpadded) or Gemm
    when that is exact (through Flatten, GlobalAveragePool, and MaxPool/GlobalMaxPool when every scale is positive),
    else kept (or rewritten as Mul+Add with standalone=mul-add). Weights in Constant nodes count as initializers.

    Stats: bn_total; folded_into_conv/conv_transpose/gemm/matmul, folded_forward, rewritten_mul_add; and for every BN
    left one reason: skipped_shared_weight (the weight/bias is used elsewhere), skipped_producer_output_used_elsewhere,
    skipped_producer_output_is_graph_output, skipped_training_mode, skipped_non_constant_params,
    skipped_non_constant_producer_weight, skipped_non_per_channel_params (opset 7 spatial=0), skipped_matmul_not_2d
    (BN's axis 1 is not the MatMul's feature axis), skipped_channel_mismatch, skipped_unknown_rank/dtype (mul-add),
    skipped_no_exact_target.
    """

    name = "fold-bn"
    Options = FoldBatchNormOptions
    kind = "exact"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        r = _Run(graph, self.options)
        r.stats["bn_total"] = 0
        bns = [n for n in graph.nodes if n.op == "BatchNormalization" and _is_default_domain(n)]
        for bn in bns:
            r.process(bn)
        r.flush()
        return PassResult(r.changed, dict(sorted(r.stats.items())))
