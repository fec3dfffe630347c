"""The pass interface: :class:`Pass`, its :class:`PassResult`, the :class:`PassContext` it runs in.

A pass is a class with a ``name``, a frozen-dataclass ``Options`` type and a ``run(graph, ctx)`` method that rewrites an
onnx-graphsurgeon graph in place and returns ``PassResult(changed, stats)``. The contract, enforced by the
:class:`~onnxopt.pass_manager.PassManager` rather than by convention:

* ``changed`` is exact: True if and only if the graph differs afterwards (node list, attributes, tensors, values).
* A pass that does not apply leaves the graph untouched and says why in ``stats`` (``skipped_<reason>`` counters).
* Analysis passes (``kind = "analysis"``) never change the graph.
* Weight arrays are replaced, never modified in place (the manager tracks values by identity).
* A pass keeps no state between runs; what it learns goes into ``stats`` or ``ctx.artifacts``.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import onnx_graphsurgeon as gs

from onnxopt.errors import OptionsError

PassKind = Literal["exact", "lossy", "analysis"]
StatValue = int | float | str

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field for pass options with its help text (shown by ``onnxopt passes``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple (or default_factory) for container defaults")
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class NoOptions:
    """A pass without options."""


@dataclass(frozen=True)
class PassResult:
    """What a pass did. ``changed`` is exact; ``stats`` explains every match and non-match."""

    changed: bool
    stats: dict[str, StatValue] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides the graph.

    Attributes:
        input_shapes: fixed shapes for graph inputs with dynamic dims (``--input-shape name=1x3x224x224``).
        calibration: a calibration data source (see :mod:`onnxopt.calibration`), for passes that need data.
        seed: seed for anything random a pass does.
        model_dir: folder of the input model (for external data), or None.
        progress: whether long-running passes may show progress bars.
        artifacts: results a pass hands to the caller or to later passes (e.g. calibration ranges, MAC tables).
        opset: the default-domain opset of the graph being optimized (set by the manager).
        freeze_initializer_inputs: initializers that are also graph inputs (IR >= 4) are defaults a caller may override;
            by default passes see them as graph inputs and never fold them. True treats them as constants and removes
            them from the model's inputs (e.g. for exports made with keep_initializers_as_inputs=True).
    """

    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calibration: Any = None
    seed: int = 0
    model_dir: Path | None = None
    progress: bool = False
    artifacts: dict[str, Any] = field(default_factory=dict)
    opset: int | None = None
    freeze_initializer_inputs: bool = False  # treat initializers that are also graph inputs as constants
    template: Any = None  # the original onnx.ModelProto header (metadata, ir_version), set by the manager

    def to_model(self, graph: gs.Graph):
        """Export ``graph`` to an ``onnx.ModelProto`` that keeps the original model's header."""
        from onnxopt.model import graph_to_model

        return graph_to_model(graph, self.template)


class Pass(ABC):
    """Base class of every pass. Subclasses set ``name``, ``Options`` and ``kind`` and implement :meth:`run`."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    kind: ClassVar[PassKind] = "exact"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "__abstractmethods__", None):
            return
        name = cls.__dict__.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise TypeError(f"{cls.__qualname__}.name must be a lower-case dashed name like 'fold-bn', got {name!r}")
        opts = cls.Options
        if not (dataclasses.is_dataclass(opts) and opts.__dataclass_params__.frozen):  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__qualname__}.Options must be a frozen dataclass")
        if cls.kind not in ("exact", "lossy", "analysis"):
            raise TypeError(f"{cls.__qualname__}.kind must be 'exact', 'lossy' or 'analysis'")

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("give either an Options instance or keyword options, not both")
        if options is None:
            valid = {f.name for f in dataclasses.fields(self.Options)}
            unknown = sorted(set(kwargs) - valid)
            if unknown:
                raise OptionsError(
                    f"pass {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                    f"valid options: {', '.join(sorted(valid)) or '(none)'}"
                )
            options = self.Options(**kwargs)
        elif not isinstance(options, self.Options):
            raise TypeError(f"{self.name}: options must be {self.Options.__name__}, got {type(options).__name__}")
        self.options = options

    @property
    def effective_kind(self) -> PassKind:
        """The kind of this configured pass (a lossy pass may be exact with some options; override to say so)."""
        return self.kind

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Check preconditions; raise :class:`~onnxopt.errors.PreconditionError` when they do not hold."""

    @abstractmethod
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Rewrite ``graph`` in place and return what changed."""

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options_dict().items())
        return f"{type(self).__name__}({opts})"
