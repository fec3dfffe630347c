"""New input shapes for a model: fix dynamic dims, or change the resolution, and propagate them through the graph.

Shared by the ``set-input-shape`` pass and ``onnxopt mac --input-shape`` (a what-if analysis that writes nothing).
:func:`plan_input_shapes` works on a weight-stripped :class:`~onnxopt.skeleton.Skeleton`: it sets the new input dims,
drops the stale inferred shapes (value_info, output dims), re-infers, and updates the small constants that bake in a
size derived from an input dim — where that is well defined:

* ``Reshape`` with a constant shape: the input shape and the target are split into aligned blocks of equal element
  count (e.g. ``[1, 256, 20, 20] -> [1, 256, 400]`` gives blocks ``1|1, 256|256, 20·20|400``); a block whose input
  dims changed and that maps to ONE target entry gets the new product (``400 -> 40·30``). A changed block that maps to
  several entries (``[20·20] -> [10, 40]``: which one scales?) is refused. ``-1`` entries stay ``-1``; ``0`` entries
  (copy the input dim) stay ``0`` where they copy the same axis.
* ``Resize`` with constant ``sizes``: the per-axis ratio ``sizes / input`` is kept (``sizes' = sizes · new / old``),
  refused when that is not an integer or with ``keep_aspect_ratio_policy`` other than ``stretch``. Resize with
  ``scales`` needs nothing.
* ``Slice`` with constant starts/ends on a changed axis: starts and negative ends count from one end of the axis, so
  they keep their meaning; an end equal to the old size means "to the end" and becomes INT64_MAX; an end inside the
  axis (a fixed crop) or a negative step is refused.
* ``Expand`` with a constant shape: an entry equal to the old size of a changed input axis takes the new size (an entry
  of 1 keeps broadcasting); any other entry is refused.
* ``Split`` with explicit sizes along a changed axis is refused.

A constant shared by several nodes gets a private copy for the node that needs a new value. Dims that were dynamic
(symbolic) before are not "changed": constants in their path were written for any size. Finally strict shape inference
must succeed on the result; when it does not (e.g. a positional embedding of a fixed length added to a feature map),
the refusal names the node where it fails. Refusals are :class:`~onnxopt.errors.PreconditionError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt.errors import OptionsError, PreconditionError, first_line
from onnxopt.skeleton import ConstInfo, Dim, Shape, Skeleton, typed_shapes

INT64_MAX = np.iinfo(np.int64).max
#: stand-ins for symbolic dims in the Reshape block alignment (primes far above any real dim)
_STAND_INS = (1_000_003, 1_000_033, 1_000_037, 1_000_039, 1_000_081, 1_000_099, 1_000_117, 1_000_121)
_DIM_RE = re.compile(r"^(\d+|\?)$")


def parse_shape_spec(name: str, text: str, current: Shape) -> tuple[Dim, ...]:
    """``"1x3x720x1280"`` -> ``(1, 3, 720, 1280)``; ``?`` keeps the input's current dim (e.g. a symbolic batch)."""
    parts = [p.strip() for p in str(text).strip().split("x")]
    if not parts or not all(_DIM_RE.match(p) for p in parts):
        raise OptionsError(f"bad shape {text!r} for input {name!r}: expected dims like 1x3x720x1280 ('?' keeps a dim)")
    if len(parts) != len(current):
        raise OptionsError(
            f"shape {text!r} for input {name!r} has rank {len(parts)}, the input has rank {len(current)}"
        )
    dims: list[Dim] = []
    for p, cur in zip(parts, current):
        if p == "?":
            dims.append(cur)
        elif int(p) <= 0:
            raise OptionsError(f"bad shape {text!r} for input {name!r}: dims must be positive")
        else:
            dims.append(int(p))
    return tuple(dims)


@dataclass
class ConstantUpdate:
    """A new value for input ``index`` of the node producing ``node_output`` (``new_name``: a private copy)."""

    node: str
    node_output: str
    index: int
    old_name: str
    value: np.ndarray
    new_name: str | None = None


@dataclass
class ShapePlan:
    """The result of :func:`plan_input_shapes`."""

    skeleton: Skeleton
    inferred: onnx.ModelProto | None
    old_inputs: dict[str, Shape]
    new_inputs: dict[str, Shape]
    updates: list[ConstantUpdate] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.old_inputs != self.new_inputs

    def shapes(self) -> dict[str, tuple[int, Shape | None]]:
        """(elem_type, shape) of every value after the change."""
        return typed_shapes(self.inferred) if self.inferred is not None else {}


def input_shapes(skel: Skeleton) -> dict[str, Shape]:
    from onnxopt.shapes import graph_inputs

    return {s.name: s.shape for s in graph_inputs(skel.inputs_model())}


def plan_input_shapes(model: onnx.ModelProto, specs: dict[str, str | tuple[Dim, ...]]) -> ShapePlan:
    """Plan new input shapes. ``specs``: input name -> ``"1x3x720x1280"`` (or a tuple of dims).

    Raises :class:`OptionsError` for unknown inputs or bad specs and :class:`PreconditionError` when a constant that
    bakes in a size cannot be updated unambiguously (the message names the node).
    """
    skel = Skeleton(model)
    current = input_shapes(skel)
    unknown = sorted(set(specs) - set(current))
    if unknown:
        raise OptionsError(
            f"no graph input named {', '.join(map(repr, unknown))}; inputs are: {', '.join(sorted(current))}"
        )
    new: dict[str, Shape] = {}
    for name, spec in specs.items():
        if isinstance(spec, str):
            new[name] = parse_shape_spec(name, spec, current[name])
        else:
            if len(spec) != len(current[name]):
                raise OptionsError(f"shape {list(spec)} for input {name!r}: the input has rank {len(current[name])}")
            new[name] = tuple(spec)
    old_inputs = {k: current[k] for k in new}
    plan = ShapePlan(skel, None, old_inputs, dict(new))
    if not plan.changed:
        return plan
    old = typed_shapes(skel.infer())
    skel.set_input_shapes(new)
    skel.clear_inferred()
    _Propagator(skel, old, plan).run()
    try:
        plan.inferred = skel.infer(strict=True)
    except Exception as e:  # noqa: BLE001 - onnx raises InferenceError and others
        first = first_line(e)
        raise PreconditionError(f"with the new input shapes, shape inference fails: {first}") from e
    outs = typed_shapes(plan.inferred)
    plan.stats["inputs_changed"] = sum(1 for k in new if new[k] != old_inputs[k])
    plan.stats["outputs_changed"] = sum(
        1 for o in skel.model.graph.output if (old.get(o.name) or (0, None))[1] != (outs.get(o.name) or (0, None))[1]
    )
    return plan


class _Refuse(Exception):
    pass


class _Propagator:
    """Walks the nodes in order and updates size-baking constants (see the module docstring)."""

    def __init__(self, skel: Skeleton, old: dict[str, tuple[int, Shape | None]], plan: ShapePlan) -> None:
        self.skel = skel
        self.old = old
        self.plan = plan
        self.cur: dict[str, tuple[int, Shape | None]] = {}
        self.dirty = True
        g = skel.model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
        self.consumers: dict[str, int] = {}
        for n in g.node:
            for x in n.input:
                self.consumers[x] = self.consumers.get(x, 0) + 1
        self.taken = {t.name for t in g.initializer} | {x for n in g.node for x in list(n.input) + list(n.output)}

    # -- helpers -----------------------------------------------------------------------------------------------------
    def value(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.const_nodes.get(name)
        if n is None:
            return None
        for a in n.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name == "value_ints":
                return np.array(list(a.ints), dtype=np.int64)
            if a.name == "value_int":
                return np.array(a.i, dtype=np.int64)
        return None

    def shapes_of(self, name: str) -> tuple[Shape | None, Shape | None]:
        if self.dirty:
            self.cur = typed_shapes(self.skel.infer())
            self.dirty = False
        return (self.old.get(name) or (0, None))[1], (self.cur.get(name) or (0, None))[1]

    def set_value(self, node: onnx.NodeProto, index: int, value: np.ndarray, stat: str) -> None:
        name = node.input[index]
        new_name = None
        if self.consumers.get(name, 0) > 1:
            base = f"{name}_{node.name or node.output[0]}"
            new_name, k = base, 0
            while new_name in self.taken:
                k += 1
                new_name = f"{base}_{k}"
            self.taken.add(new_name)
            self.consumers[name] -= 1
            self.consumers[new_name] = 1
            node.input[index] = new_name
            t = numpy_helper.from_array(value, new_name)
            self.skel.model.graph.initializer.append(t)
            self.inits[new_name] = t
            self.skel.constants[new_name] = ConstInfo(new_name, t.data_type, tuple(t.dims), "initializer")
        elif name in self.inits:
            self.inits[name].CopyFrom(numpy_helper.from_array(value, name))
        else:
            cn = self.const_nodes[name]
            del cn.attribute[:]
            cn.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(value, name)))
        self.plan.updates.append(ConstantUpdate(node.name, node.output[0], index, name, value, new_name))
        self.plan.stats[stat] = self.plan.stats.get(stat, 0) + 1
        self.dirty = True

    # -- the walk ----------------------------------------------------------------------------------------------------
    def run(self) -> None:
        handlers = {"Reshape": self.reshape, "Resize": self.resize, "Slice": self.slice, "Expand": self.expand,
                    "Split": self.split}
        for n in list(self.skel.model.graph.node):
            fn = handlers.get(n.op_type) if n.domain in ("", "ai.onnx") else None
            if fn is None or not n.input:
                continue
            old, new = self.shapes_of(n.input[0])
            if old is None or new is None or len(old) != len(new):
                continue
            changed = [i for i, (o, w) in enumerate(zip(old, new)) if isinstance(o, int) and o != w]
            if not changed:
                continue
            # Dims that were dynamic before: take the new value (the constants were written for any size).
            eff_old = tuple(o if isinstance(o, int) else w for o, w in zip(old, new))
            try:
                fn(n, eff_old, new, changed)
            except _Refuse as e:
                label = f"{n.op_type} node {n.name or n.output[0]!r}"
                raise PreconditionError(f"cannot change the input shapes: {label} {e}") from None

    def reshape(self, n: onnx.NodeProto, old: Shape, new: Shape, changed: list[int]) -> None:
        if len(n.input) < 2:
            return
        target = self.value(n.input[1])
        if target is None:
            return  # computed from Shape ops: follows the new shape by itself
        if any(d is None for d in new):
            raise _Refuse(
                f"has a constant target shape {target.tolist()} but its new input shape {list(new)} is unknown"
            )
        # Symbolic dims (unchanged by definition) take distinct large primes for the block alignment; a new entry
        # that would contain one is refused (it mixes a dynamic dim with a changed one).
        symbols = list(dict.fromkeys(d for d in new if isinstance(d, str)))
        if len(symbols) > len(_STAND_INS):
            raise _Refuse(f"has a constant target shape and {len(symbols)} dynamic input dims")
        stand = dict(zip(symbols, _STAND_INS))
        old_c = tuple(stand.get(d, d) for d in old)
        new_c = tuple(stand.get(d, d) for d in new)
        allowzero = next((a.i for a in n.attribute if a.name == "allowzero"), 0)
        result = reshape_target(old_c, new_c, [int(v) for v in target.tolist()], bool(allowzero))
        for r, t in zip(result, target.tolist()):
            if r != t and any(r % p == 0 for p in stand.values()):
                raise _Refuse(f"would need a dynamic dim in its constant target shape {target.tolist()}")
        if result != target.tolist():
            self.set_value(n, 1, np.array(result, dtype=target.dtype), "reshape_updated")

    def resize(self, n: onnx.NodeProto, old: Shape, new: Shape, changed: list[int]) -> None:
        if len(n.input) < 4 or not n.input[3]:
            return  # scales: the output follows the input
        sizes = self.value(n.input[3])
        if sizes is None:
            return
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        policy = attrs.get("keep_aspect_ratio_policy", b"stretch")
        policy = policy.decode() if isinstance(policy, bytes) else policy
        axes = list(attrs.get("axes", range(len(old))))
        axes = [a + len(old) if a < 0 else a for a in axes]
        out = [int(v) for v in sizes.tolist()]
        for k, axis in enumerate(axes):
            if axis not in changed:
                continue
            if policy != "stretch":
                raise _Refuse(f"resizes to fixed sizes {sizes.tolist()} with keep_aspect_ratio_policy={policy!r}")
            num = out[k] * int(new[axis])  # type: ignore[arg-type]
            if num % old[axis]:  # type: ignore[operator]
                raise _Refuse(
                    f"resizes axis {axis} from {old[axis]} to {out[k]}; with the new size {new[axis]} the same ratio "
                    f"gives {num / old[axis]:g}, not an integer"  # type: ignore[operator]
                )
            out[k] = num // old[axis]  # type: ignore[operator]
        if out != sizes.tolist():
            self.set_value(n, 3, np.array(out, dtype=sizes.dtype), "resize_updated")

    def slice(self, n: onnx.NodeProto, old: Shape, new: Shape, changed: list[int]) -> None:
        if len(n.input) < 3:
            return  # opset < 10 keeps starts/ends in attributes: handled by the final inference check
        vals = [self.value(x) if i < len(n.input) and x else None for i, x in enumerate(n.input[1:5], start=1)]
        starts, ends = vals[0], vals[1]
        axes = vals[2] if len(vals) > 2 and vals[2] is not None else None
        steps = vals[3] if len(vals) > 3 and vals[3] is not None else None
        if starts is None or ends is None or (len(n.input) > 3 and n.input[3] and axes is None) or (
            len(n.input) > 4 and n.input[4] and steps is None
        ):
            return  # computed bounds
        axes_l = [int(a) + len(old) if a < 0 else int(a) for a in (axes.tolist() if axes is not None
                                                                    else range(len(starts)))]
        steps_l = [int(s) for s in steps.tolist()] if steps is not None else [1] * len(axes_l)
        new_ends = [int(e) for e in ends.tolist()]
        for k, axis in enumerate(axes_l):
            if axis not in changed:
                continue
            d_old, e, st = int(old[axis]), new_ends[k], steps_l[k]  # type: ignore[arg-type]
            if st < 0:
                raise _Refuse(f"slices axis {axis} (which changes size) with a negative step")
            if e < 0:
                continue
            if e >= d_old:
                if isinstance(new[axis], int) and e < new[axis]:
                    new_ends[k] = int(INT64_MAX)
                continue
            raise _Refuse(f"crops axis {axis} at the fixed index {e} (old size {d_old}); refusing to guess the new end")
        if new_ends != ends.tolist():
            self.set_value(n, 2, np.array(new_ends, dtype=ends.dtype), "slice_updated")

    def expand(self, n: onnx.NodeProto, old: Shape, new: Shape, changed: list[int]) -> None:
        target = self.value(n.input[1]) if len(n.input) > 1 else None
        if target is None:
            return
        t = [int(v) for v in target.tolist()]
        offset = len(t) - len(old)
        for axis in changed:
            j = axis + offset
            if j < 0 or t[j] == 1:
                continue
            if t[j] == old[axis]:
                t[j] = int(new[axis])  # type: ignore[arg-type]
            else:
                raise _Refuse(f"expands axis {axis} to the fixed size {t[j]}")
        if t != target.tolist():
            self.set_value(n, 1, np.array(t, dtype=target.dtype), "expand_updated")

    def split(self, n: onnx.NodeProto, old: Shape, new: Shape, changed: list[int]) -> None:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        axis = axis + len(old) if axis < 0 else axis
        explicit = (len(n.input) > 1 and bool(n.input[1])) or any(a.name == "split" for a in n.attribute)
        if axis in changed and explicit:
            raise _Refuse(f"splits axis {axis} (which changes size) into fixed sizes")


def _align(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]]:
    """Split two shapes of equal element count into aligned blocks of equal products."""
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        xs: list[int] = []
        ts: list[int] = []
        pa = pb = 1
        if i < len(a):
            xs.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            ts.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                xs.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                ts.append(j)
                pb *= b[j]
                j += 1
            else:
                raise _Refuse(f"target shape {b} does not match its input shape {a}")
        blocks.append((xs, ts))
    return blocks


def reshape_target(old: Shape, new: Shape, target: list[int], allowzero: bool = False) -> list[int]:
    """The Reshape target for input shape ``new`` that does what ``target`` did for ``old`` (raises _Refuse)."""
    if any(not isinstance(d, int) or d <= 0 for d in old):
        raise _Refuse(f"input shape {list(old)} is not static and positive")
    full = []
    infer_at = None
    for k, v in enumerate(target):
        if v == 0 and not allowzero:
            if k >= len(old):
                raise _Refuse(f"target {target}: 0 at axis {k} beyond the input rank")
            full.append(old[k])
        elif v == -1:
            infer_at = k
            full.append(1)
        else:
            full.append(v)
    if infer_at is not None:
        rest = math.prod(full)
        if rest == 0 or math.prod(old) % rest:
            raise _Refuse(f"target {target} does not fit the input shape {list(old)}")
        full[infer_at] = math.prod(old) // rest
    if math.prod(full) != math.prod(old):
        raise _Refuse(f"target {target} does not fit the input shape {list(old)}")
    result = list(target)
    for xs, ts in _align(list(old), full):  # type: ignore[arg-type]
        if all(old[i] == new[i] for i in xs):
            continue
        if len(ts) != 1:
            shown = "·".join(str(old[i]) for i in xs)
            raise _Refuse(
                f"maps input dims {shown} (which change) onto several target entries {[full[t] for t in ts]}; "
                "refusing to guess which one scales"
            )
        t = ts[0]
        value = math.prod(int(new[i]) for i in xs)  # type: ignore[arg-type]
        if target[t] == -1:
            continue
        if target[t] == 0 and not allowzero and xs == [t]:
            continue
        result[t] = value
    return result


__all__ = ["plan_input_shapes", "parse_shape_spec", "reshape_target", "ShapePlan", "ConstantUpdate"]
