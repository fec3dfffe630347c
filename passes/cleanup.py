"""``cleanup``: constant folding, dead code, Identity/Dropout, unused and duplicate initializers, topological order.

Steps, in order (each can be switched off with its option):

1. ``toposort``: sort the nodes of every (sub)graph whose order is not topological. A graph that is already in a valid
   order is left alone (graphsurgeon's sort would reorder it by depth, which is churn, not a fix).
2. ``remove_identity`` / ``remove_dropout``: bypass Identity nodes and inference-mode Dropout (no ``training_mode``
   input or a constant false one; opset < 12 Dropout is inference-only at runtime; the mask output unused). When the
   node's output is a graph output its producer is renamed to produce it, so output names never change; an Identity
   or Dropout that connects a graph input (or a constant) straight to a graph output is kept.
3. ``remove_dead_nodes``: remove nodes that no graph output depends on (with the initializers only they used).
4. ``fold_constants``: ``Constant`` nodes become initializers (with their ONNX types: value_float is float32); ``Shape``
   and ``Size`` of tensors whose shape is static are folded (``fold_shapes``); then onnx-graphsurgeon's
   ``fold_constants`` evaluates every node whose inputs are all constant with ONNX Runtime. Not folded, with a
   ``skipped_fold_<reason>`` count: nondeterministic ops (random*, Bernoulli, Dropout), Q/DQ, control flow and
   sequence/optional producers, ops of domains ONNX Runtime does not know, producers of graph outputs (an output's
   declared type and shape must not change), and results over ``size_threshold`` bytes. A node ONNX Runtime cannot
   evaluate is a *fold failure*: counted in ``fold_failures``, named in ``fold_failed`` and listed with the error in
   ``ctx.artifacts["cleanup"]["fold_failures"]``; the node stays, everything else is still folded.
5. ``merge_duplicates``: initializers with equal dtype, shape and bytes become one (compared by dtype and shape
   first, then by bytes, so only candidates are read).

Unused initializers are removed as they appear (graphsurgeon keeps only the constants nodes use). ``changed`` is
exact: it is True only when one of the counts is non-zero, and a second run on a cleaned graph reports no change.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
from onnx_graphsurgeon.logger import G_LOGGER

from onnxopt.errors import first_line
from onnxopt.pass_base import Pass, PassContext, PassResult, option

#: Ops whose result changes from run to run: never folded.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial", "Dropout"}
)
#: Quantization boundaries are kept for back ends that fuse them (graphsurgeon never folds them either).
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
#: Ops that may produce sequences or optionals, which a folded initializer cannot hold.
NON_TENSOR_OPS = frozenset(
    {
        "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceMap",
        "SplitToSequence", "Optional", "OptionalGetElement",
    }
)
#: Domains ONNX Runtime's CPU provider implements (others are custom ops that folding cannot evaluate).
FOLDABLE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

#: Stat keys always reported (zero included), so a report shows every step.
COUNTS = (
    "folded_nodes", "folded_shape_nodes", "lowered_constant_nodes", "fold_failures", "removed_identity",
    "removed_dropout", "removed_dead_nodes", "removed_unused_initializers", "merged_duplicate_initializers",
    "toposorted_graphs",
)

_MAX_NAMED = 10  # failing nodes named in the stats string (all of them go to ctx.artifacts)


@dataclass(frozen=True)
class CleanupOptions:
    fold_constants: bool = option(
        True, help="Fold nodes whose inputs are all constant (evaluated with ONNX Runtime through onnx-graphsurgeon)."
    )
    fold_shapes: bool = option(True, help="Fold Shape and Size of tensors whose shape is static (with fold_constants).")
    size_threshold: int = option(
        1 << 24, help="Do not fold a result larger than this many bytes (-1: no limit); keeps models from bloating."
    )
    remove_identity: bool = option(True, help="Remove Identity nodes.")
    remove_dropout: bool = option(True, help="Remove inference-mode Dropout (mask unused, training_mode absent/false).")
    remove_dead_nodes: bool = option(True, help="Remove nodes no graph output depends on.")
    merge_duplicates: bool = option(True, help="Merge initializers with equal dtype, shape and bytes.")
    toposort: bool = option(True, help="Sort nodes topologically when their order is not.")


class Cleanup(Pass):
    """Fold constants, remove dead nodes, Identity, inference Dropout, unused and duplicate initializers; toposort."""

    name = "cleanup"
    Options = CleanupOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        stats: Counter[str] = Counter({k: 0 for k in COUNTS})
        constants_before = _constants(graph)
        failures: list[dict[str, str]] = []
        sorted_ok = True

        if o.toposort:
            stats["toposorted_graphs"] = _toposort(graph)
        else:
            sorted_ok = all(_is_sorted(g) for g in _graphs(graph))
        if o.remove_identity or o.remove_dropout:
            for g in _graphs(graph):
                _bypass(g, o, stats)
        keep: set[int] = set()
        if o.remove_dead_nodes:
            stats["removed_dead_nodes"] = _sweep(graph)
        elif o.fold_constants:
            keep = _dead_nodes(graph)  # folding must not take them away
        if o.fold_constants:
            if sorted_ok:
                failures = _Folder(graph, o, ctx, stats, keep).run()
            else:
                stats["skipped_fold_unsorted_graph"] = 1
        merged = _merge_duplicates(graph) if o.merge_duplicates else set()
        if merged:
            stats["merged_duplicate_initializers"] = len(merged)

        after = _constants(graph)
        stats["removed_unused_initializers"] = sum(1 for k in constants_before if k not in after and k not in merged)
        if failures:
            named = ", ".join(f"{f['node']}({f['op']})" for f in failures[:_MAX_NAMED])
            more = len(failures) - _MAX_NAMED
            stats["fold_failed"] = named + (f", ... {more} more" if more > 0 else "")
            ctx.artifacts.setdefault("cleanup", {})["fold_failures"] = failures
        changed = any(stats[k] for k in COUNTS if k != "fold_failures")
        return PassResult(changed=changed, stats=dict(stats))


# -- graph walking ---------------------------------------------------------------------------------------------------
def _subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The node's subgraph attributes (If/Loop/Scan bodies); cheaper than graphsurgeon's generator."""
    return [v for v in node.attrs.values() if isinstance(v, gs.Graph)] if node.attrs else []


def _graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every nested subgraph, outer before inner."""
    yield graph
    for node in graph.nodes:
        for sub in _subgraphs(node):
            yield from _graphs(sub)


def _node_count(graph: gs.Graph) -> int:
    return sum(len(g.nodes) for g in _graphs(graph))


def _constants(graph: gs.Graph) -> dict[int, gs.Constant]:
    """Every constant (initializer) used in the graph or its subgraphs, by identity."""
    out: dict[int, gs.Constant] = {}
    for g in _graphs(graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                out[id(t)] = t
    return out


def _detach(node: gs.Node) -> None:
    node.inputs.clear()
    node.outputs.clear()


def _replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of ``old`` (at any nesting depth) read ``new`` instead."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


# -- 1. topological order --------------------------------------------------------------------------------------------
def _is_sorted(graph: gs.Graph) -> bool:
    produced_here = {id(t) for n in graph.nodes for t in n.outputs}
    seen: set[int] = set()
    for node in graph.nodes:
        needed = list(node.inputs)
        for sub in _subgraphs(node):
            needed.extend(sub._foreign_tensors().values())
        if any(id(t) in produced_here and id(t) not in seen for t in needed):
            return False
        seen.update(id(t) for t in node.outputs)
    return True


def _toposort(graph: gs.Graph) -> int:
    """Sort each (sub)graph whose order is not topological; the number of graphs reordered."""
    count = 0
    for g in list(_graphs(graph)):
        if not _is_sorted(g):
            before = [id(n) for n in g.nodes]
            g.toposort(recurse_subgraphs=False, recurse_functions=False)
            count += [id(n) for n in g.nodes] != before
    return count


# -- 2. Identity and Dropout -----------------------------------------------------------------------------------------
def _dropout_skip_reason(node: gs.Node, graph: gs.Graph) -> str | None:
    """None when ``node`` is an inference-mode Dropout whose mask is unused, else the reason to keep it."""
    from onnxopt.graphutil import const_value

    if node.attrs.get("is_test", 1) == 0:  # opset < 7: is_test=0 means training
        return "dropout_training_mode"
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        mode = const_value(node.inputs[2])
        if mode is None:
            return "dropout_training_mode_not_constant"
        mode = np.asarray(mode)
        if mode.size and bool(mode.reshape(-1)[0]):
            return "dropout_training_mode"
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    if mask is not None and not mask.is_empty() and (mask.outputs or any(mask is t for t in graph.outputs)):
        return "dropout_mask_used"
    return None


def _bypass(graph: gs.Graph, o: CleanupOptions, stats: Counter[str]) -> None:
    """Remove Identity / inference Dropout nodes of ``graph`` (not of its subgraphs)."""
    own = {id(n) for n in graph.nodes}
    outputs = {id(t) for t in graph.outputs}
    inputs = {id(t) for t in graph.inputs}
    removed: set[int] = set()
    for node in graph.nodes:
        if node.op == "Identity" and o.remove_identity and node.domain in (None, "", "ai.onnx"):
            kind = "identity"
        elif node.op == "Dropout" and o.remove_dropout and node.domain in (None, "", "ai.onnx"):
            reason = _dropout_skip_reason(node, graph)
            if reason:
                stats[f"skipped_{reason}"] += 1
                continue
            kind = "dropout"
        else:
            continue
        if not node.inputs or not node.outputs or node.inputs[0].is_empty():
            continue
        x, y = node.inputs[0], node.outputs[0]
        if id(y) not in outputs:
            _detach(node)
            _replace_uses(y, x)
        else:
            # y must keep its name: let x's producer produce y instead, if x is an ordinary value of this graph.
            prod = x.inputs[0] if len(x.inputs) == 1 else None
            if (
                prod is None or id(prod) not in own or id(x) in outputs or id(x) in inputs
                or isinstance(x, gs.Constant)
            ):
                stats[f"skipped_{kind}_graph_io"] += 1
                continue
            _detach(node)
            _replace_uses(x, y)
            prod.outputs[prod.outputs.index(x)] = y
        removed.add(id(node))
        stats[f"removed_{kind}"] += 1
    if removed:
        graph.nodes = [n for n in graph.nodes if id(n) not in removed]


# -- 3. dead nodes ---------------------------------------------------------------------------------------------------
def _live_nodes(graph: gs.Graph, roots: set[int] | frozenset[int] = frozenset()) -> set[int]:
    """Ids of the nodes of ``graph`` that its outputs (or the nodes in ``roots``) depend on, in any node order."""
    producer = {id(t): n for n in graph.nodes for t in n.outputs}
    live: set[int] = set()
    stack: list[gs.Tensor] = list(graph.outputs)
    for n in graph.nodes:
        if id(n) in roots:
            live.add(id(n))
            stack.extend(_needs(n))
    while stack:
        t = stack.pop()
        n = producer.get(id(t))
        if n is not None and id(n) not in live:
            live.add(id(n))
            stack.extend(_needs(n))
    return live


def _needs(node: gs.Node) -> list[gs.Tensor]:
    needed = [t for t in node.inputs if not t.is_empty()]
    for sub in _subgraphs(node):
        needed.extend(sub._foreign_tensors().values())
    return needed


def _dead_nodes(graph: gs.Graph) -> set[int]:
    dead: set[int] = set()
    for g in _graphs(graph):
        live = _live_nodes(g)
        dead.update(id(n) for n in g.nodes if id(n) not in live)
    return dead


def _sweep(graph: gs.Graph, keep: set[int] | frozenset[int] = frozenset()) -> int:
    """Remove the dead nodes of ``graph`` and its live subgraphs (inner graphs first), except those in ``keep``.
    Returns the number of nodes removed, nested ones included."""
    removed = 0
    for node in graph.nodes:
        for sub in _subgraphs(node):
            removed += _sweep(sub, keep)
    live = _live_nodes(graph, keep)
    if len(live) == len(graph.nodes):
        return removed
    kept = []
    for node in graph.nodes:
        if id(node) in live:
            kept.append(node)
        else:
            removed += 1 + sum(_node_count(s) for s in _subgraphs(node))
            _detach(node)
    graph.nodes = kept
    return removed


# -- 4. constant folding ---------------------------------------------------------------------------------------------
class _Folder:
    """One folding run over a graph and its subgraphs (state lives here, not in the pass).

    graphsurgeon asks ``should_exclude_node`` about nodes of a *copy* of the graph, so protected values are known by
    name (tensor names are unique in a valid model), not by identity.
    """

    def __init__(self, graph: gs.Graph, o: CleanupOptions, ctx: PassContext, stats: Counter[str], keep: set[int]):
        self.graph = graph
        self.o = o
        self.ctx = ctx
        self.stats = stats
        self.keep = keep
        self.limit = None if o.size_threshold < 0 else int(o.size_threshold)
        self.failures: list[dict[str, str]] = []
        graphs = list(_graphs(graph))
        self.output_names = {t.name for g in graphs for t in g.outputs}
        self.kept_names = {t.name for g in graphs for n in g.nodes if id(n) in keep for t in n.outputs}

    def _exclusion(self, node: gs.Node) -> str | None:
        """Why ``node`` must not be folded, or None."""
        if node.op in ("Constant", _HIDDEN_CONSTANT):
            return "constant_node"
        if node.domain not in (None, *FOLDABLE_DOMAINS):
            return "custom_domain"
        if node.op in NONDETERMINISTIC_OPS:
            return "nondeterministic"
        if node.op in QDQ_OPS:
            return "qdq"
        if node.op in NON_TENSOR_OPS or _subgraphs(node):
            return "control_flow_or_sequence"
        if any(t.name in self.output_names for t in node.outputs):
            return "graph_output"
        if any(t.name in self.kept_names for t in node.outputs):
            return "dead_node_kept"
        return None

    def run(self) -> list[dict[str, str]]:
        self.stats["lowered_constant_nodes"] += sum(self._lower_constants(g) for g in _graphs(self.graph))
        folded = 0
        for _ in range(_MAX_ROUNDS):
            # Folding can make a shape static (e.g. Split sizes that were computed), so Shape/Size get another try.
            shapes = self._fold_shapes() if self.o.fold_shapes else 0
            self.stats["folded_shape_nodes"] += shapes
            for g in list(_graphs(self.graph)):
                if self._anything_to_fold(g):
                    before = {id(t) for t in g.tensors().values() if isinstance(t, gs.Constant)}
                    self._gs_fold(g)
                    for t in g.tensors().values():
                        if isinstance(t, gs.Constant) and id(t) not in before:
                            t._values = _exportable(t._values, t.name)
            done = _sweep(self.graph, self.keep)  # nodes whose outputs became constants (and what only fed them)
            folded += done
            if not (done or shapes) or not self._shape_targets():
                break
        folded += self._classify_leftovers()
        self.stats["folded_nodes"] += folded
        self.stats["fold_failures"] = len(self.failures)
        return self.failures

    def _lower_constants(self, g: gs.Graph) -> int:
        """``Constant`` nodes -> initializers, with ONNX's types (graphsurgeon would make value_float a float64).
        Those producing a graph output stay (the output keeps its declared type and shape)."""
        lowered = []
        for node in g.nodes:
            if node.op != "Constant" or node.domain not in (None, "", "ai.onnx") or len(node.outputs) != 1:
                continue
            t = node.outputs[0]
            if t.name in self.output_names or t.name in self.kept_names or len(node.attrs) != 1:
                continue
            key, val = next(iter(node.attrs.items()))
            if key == "value" and isinstance(val, gs.Constant) and not _is_string(val._values):
                values: Any = val._values
            elif key in ("value_float", "value_floats"):
                values = np.array(val, dtype=np.float32)
            elif key in ("value_int", "value_ints"):
                values = np.array(val, dtype=np.int64)
            else:
                continue  # value_string(s), sparse_value: left as they are
            _detach(node)
            t.to_constant(values)
            lowered.append(id(node))
        if lowered:
            dead = set(lowered)
            g.nodes = [n for n in g.nodes if id(n) not in dead]
        return len(lowered)

    def _shape_targets(self) -> list[gs.Node]:
        return [
            node for g in _graphs(self.graph) for node in g.nodes
            if node.op in ("Shape", "Size") and node.domain in (None, "", "ai.onnx") and len(node.outputs) == 1
            and self._exclusion(node) is None
        ]

    def _fold_shapes(self) -> int:
        """Shape/Size of tensors with a static shape -> int64 initializers."""
        targets = self._shape_targets()

        def declared(t: gs.Tensor) -> tuple | None:
            return tuple(t.shape) if t.shape is not None else None

        # Inference runs on an export of the graph, so before any node is touched.
        inferred = self._inferred_shapes() if any(not _static(declared(n.inputs[0])) for n in targets) else {}
        folded = 0
        for node in targets:
            x = node.inputs[0]
            shape = declared(x)
            if not _static(shape):
                shape = inferred.get(x.name)
            if not _static(shape):
                continue
            dims = [int(d) for d in shape]  # type: ignore[union-attr]
            if node.op == "Size":
                value = np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
            else:
                rank = len(dims)
                start = int(node.attrs.get("start", 0))
                end = node.attrs.get("end")
                start = min(max(start + rank if start < 0 else start, 0), rank)
                end = rank if end is None else int(end)
                end = min(max(end + rank if end < 0 else end, 0), rank)
                value = np.array(dims[start:end], dtype=np.int64)
            out = node.outputs[0]
            _detach(node)
            out.to_constant(value)
            folded += 1
        return folded

    def _inferred_shapes(self) -> dict[str, tuple]:
        """Shapes from ONNX shape inference on a weight-stubbed export (main graph values only)."""
        from onnxopt.model import graph_skeleton
        from onnxopt.shapes import infer_shapes, value_shapes

        try:
            return value_shapes(infer_shapes(graph_skeleton(self.graph, self.ctx.template)))
        except Exception as e:  # noqa: BLE001 - no inferred shapes means no shape folding, which we report
            self.stats["skipped_fold_shapes_inference_failed"] += 1
            self.ctx.artifacts.setdefault("cleanup", {})["shape_inference_error"] = first_line(e)[:300]
            return {}

    def _anything_to_fold(self, g: gs.Graph) -> bool:
        """Whether graphsurgeon would find work in ``g`` (its folding copies the graph even when there is none)."""
        known = {id(t) for t in g.tensors().values() if isinstance(t, gs.Constant)}
        return any(
            all(id(t) in known for t in n.inputs if not t.is_empty()) and self._exclusion(n) is None for n in g.nodes
        )

    def _gs_fold(self, g: gs.Graph) -> None:
        """graphsurgeon's folding: one ONNX Runtime session for everything; if that fails, partitioned so that one
        bad node does not stop the rest (nodes that still fail are found and reported by _classify_leftovers)."""
        kwargs = dict(
            fold_shapes=False,  # its shape folding ignores Shape's start/end and its cast elision is not exact
            recurse_subgraphs=False,  # it would not pass should_exclude_node down; we visit every graph ourselves
            flatten_subgraphs=False,
            recurse_functions=False,
            size_threshold=self.limit,
            should_exclude_node=lambda n: self._exclusion(n) is not None,
        )
        # Constant nodes still here are kept on purpose; hide them from graphsurgeon, which would lower them all.
        hidden = [n for n in g.nodes if n.op == "Constant"]
        for n in hidden:
            n.op = _HIDDEN_CONSTANT
        try:
            with G_LOGGER.suppress(G_LOGGER.CRITICAL):
                try:
                    g.fold_constants(partitioning=None, error_ok=False, **kwargs)
                except Exception:  # noqa: BLE001 - retried partitioned; failing nodes are reported afterwards
                    g.fold_constants(partitioning="recursive", error_ok=True, **kwargs)
        finally:
            for n in hidden:
                n.op = "Constant"

    def _classify_leftovers(self) -> int:
        """Nodes that still have only constant inputs: excluded (counted by reason), too large, or failing in ONNX
        Runtime (reported). One that evaluates fine and is small is folded here (graphsurgeon does not evaluate a
        value whose consumers are all foldable, even when those turn out too large to fold). Returns nodes folded."""
        folded = False
        for g in _graphs(self.graph):
            known = {id(t) for t in g.tensors().values() if isinstance(t, gs.Constant)}
            for node in g.nodes:  # in topological order, so folding here feeds the nodes after it
                if node.op == "Constant" or not all(id(t) in known for t in node.inputs if not t.is_empty()):
                    continue
                reason = self._exclusion(node)
                if reason is None and self._known_too_large(node):
                    reason = "size"
                if reason is None:
                    reason = self._evaluate(node)
                if reason == "failed":
                    pass  # counted in fold_failures, listed in fold_failed
                elif reason:
                    self.stats[f"skipped_fold_{reason}"] += 1
                else:
                    known.update(id(t) for t in node.outputs)
                    _detach(node)
                    folded = True
        return _sweep(self.graph, self.keep) if folded else 0

    def _known_too_large(self, node: gs.Node) -> bool:
        if self.limit is None:
            return False
        for t in node.outputs:
            if t.is_empty() or t.dtype is None or not _static(t.shape):
                continue
            try:
                itemsize = np.dtype(_np_dtype(t.dtype)).itemsize
            except TypeError:
                continue
            if int(np.prod([int(d) for d in t.shape], dtype=np.int64)) * itemsize > self.limit:
                return True
        return False

    def _evaluate(self, node: gs.Node) -> str | None:
        """Run ``node`` alone in ONNX Runtime; on success turn its outputs into constants (and return None), else
        return why not. A failure is recorded with ONNX Runtime's message."""
        from onnxopt.validate import run, session

        copy = gs.Node(
            op=node.op, name=node.name, domain=node.domain, attrs=dict(node.attrs),
            inputs=[t if t.is_empty() else gs.Constant(t.name, t._values, export_dtype=t._export_dtype)
                    for t in node.inputs],
            outputs=[gs.Variable.empty() if t.is_empty() else gs.Variable(t.name) for t in node.outputs],
        )
        part = gs.Graph(
            nodes=[copy], outputs=[t for t in copy.outputs if not t.is_empty()], opset=self.graph.opset,
            import_domains=self.graph.import_domains, ir_version=self.graph.ir_version,
        )
        try:
            values = run(session(gs.export_onnx(part, do_type_check=False)), {})
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's (and export's) errors are reported, not raised
            self.failures.append({"node": node.name or "(unnamed)", "op": node.op, "error": first_line(e)[:300]})
            return "failed"
        outs = [t for t in node.outputs if not t.is_empty()]
        arrays = [values.get(t.name) for t in outs]
        if not all(isinstance(a, np.ndarray) for a in arrays):
            return "control_flow_or_sequence"  # a sequence or optional: not something an initializer holds
        if self.limit is not None and any(a.nbytes > self.limit for a in arrays):
            return "size"
        for t, a in zip(outs, arrays):
            t.to_constant(_exportable(a, t.name))
        return None


_HIDDEN_CONSTANT = "Constant__kept_by_onnxopt_cleanup"
_MAX_ROUNDS = 8  # shape folding <-> constant folding rounds (each round must fold something to go on)


def _exportable(values: Any, name: str) -> Any:
    """Folded string tensors as a TensorProto (graphsurgeon exports numpy values as raw data, which strings cannot
    be); anything else as it is."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "OSU":
        return LazyValues(onnx.numpy_helper.from_array(values.astype(object), name))
    return values


def _is_string(values: Any) -> bool:
    if isinstance(values, LazyValues):
        return getattr(values.tensor, "data_type", None) == onnx.TensorProto.STRING
    return isinstance(values, np.ndarray) and values.dtype.kind in "OSU"


def _np_dtype(dtype: Any) -> Any:
    if isinstance(dtype, int):
        return onnx.helper.tensor_dtype_to_np_dtype(dtype)
    return dtype


def _static(shape: Any) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)



# -- 5. duplicate initializers ---------------------------------------------------------------------------------------
def _byte_view(t: gs.Constant) -> np.ndarray | None:
    """The tensor's bytes as a uint8 array: no copy for numpy values; a lazily imported proto's raw bytes are read
    without converting the tensor. None when the bytes are not at hand (external data, strings, sparse)."""
    v = t._values
    if isinstance(v, LazyValues):
        proto = v.tensor
        if not isinstance(proto, onnx.TensorProto) or proto.data_location == onnx.TensorProto.EXTERNAL:
            return None
        if proto.HasField("raw_data"):
            return np.frombuffer(proto.raw_data, dtype=np.uint8)
        if proto.data_type == onnx.TensorProto.STRING:
            return None
        v = onnx.numpy_helper.to_array(proto)
    if isinstance(v, np.ndarray) and v.dtype.kind not in "OSU":
        return np.ascontiguousarray(v).reshape(-1).view(np.uint8)
    return None


def _dtype_key(dtype: Any) -> str:
    """One key per element type, whether graphsurgeon gives a numpy type, a numpy dtype or an ONNX enum."""
    if dtype is None:
        return ""
    if isinstance(dtype, int):
        return f"onnx:{dtype}"
    try:
        return np.dtype(dtype).str
    except TypeError:
        return repr(dtype)


def _merge_duplicates(graph: gs.Graph) -> set[int]:
    """Point every use of a duplicate initializer of the main graph at one copy. Returns the ids of the copies
    dropped (they are unused now, so no longer part of the graph)."""
    outputs = {id(t) for t in graph.outputs}
    groups: dict[tuple, list[gs.Constant]] = defaultdict(list)
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and id(t) not in outputs and not isinstance(t._values, SparseValues):
            v = t._values
            groups[(_dtype_key(v.dtype), _dtype_key(t._export_dtype), tuple(v.shape))].append(t)
    merged: set[int] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        # Bucket by a short sample of the bytes (random weights differ there), compare whole bytes in a bucket only.
        buckets: dict[bytes, list[tuple[np.ndarray, gs.Constant]]] = defaultdict(list)
        for t in members:
            data = _byte_view(t)
            if data is None:
                continue
            bucket = buckets[data[:64].tobytes() + data[-64:].tobytes()]
            canonical = next((c for d, c in bucket if np.array_equal(d, data)), None)
            if canonical is None:
                bucket.append((data, t))
            else:
                _replace_uses(t, canonical)
                merged.add(id(t))
    return merged
