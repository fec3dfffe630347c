"""The back-end interface: build a model for a runtime, run the built artifact, time it.

A :class:`Backend` turns an ONNX model (a proto or a path) into an :class:`Artifact` (a file such as a TensorRT engine or
an OpenVINO IR, and/or an in-memory object such as a compiled model) and gives a :class:`Runner` for it. Runners take
and return numpy arrays keyed by tensor name and measure latency the same way for every back-end
(:func:`measure_latency`), so figures from different back-ends are comparable.

Also here, because several back-ends and commands need them and none of them needs a runtime installed:
shape profiles (``--input-shape name=min:opt:max``), size parsing (``--workspace 2G``) and an atomic byte writer.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import onnx

from onnxopt.errors import OptionsError
from onnxopt.model import atomic_output

# -- shape profiles ------------------------------------------------------------------------------------------------

_PROFILE_RE = re.compile(r"^(?P<name>[^=]+)=(?P<dims>[^=]+)$")


@dataclass(frozen=True)
class ShapeProfile:
    """Shapes one input may take: ``min <= opt <= max`` elementwise (TensorRT's optimization profile)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def fixed(cls, shape: tuple[int, ...]) -> "ShapeProfile":
        return cls(tuple(shape), tuple(shape), tuple(shape))

    @property
    def is_fixed(self) -> bool:
        return self.min == self.opt == self.max

    def __str__(self) -> str:
        fmt = lambda s: "x".join(map(str, s))  # noqa: E731
        return fmt(self.opt) if self.is_fixed else f"{fmt(self.min)}:{fmt(self.opt)}:{fmt(self.max)}"


def parse_profiles(specs: tuple[str, ...] | list[str]) -> dict[str, ShapeProfile]:
    """``["input=1x3x224x224:8x3x224x224:32x3x224x224", "mask=1x77"]`` -> name -> :class:`ShapeProfile`.

    Each spec is ``NAME=DIMS`` (a fixed shape) or ``NAME=MIN:OPT:MAX`` with each part a dims string like ``1x3x224x224``.
    """
    from onnxopt.shapes import parse_shape

    out: dict[str, ShapeProfile] = {}
    for spec in specs:
        m = _PROFILE_RE.match(spec.strip())
        if not m:
            raise OptionsError(f"bad --input-shape {spec!r}: expected NAME=DIMS or NAME=MIN:OPT:MAX, "
                               "e.g. input=1x3x224x224:4x3x224x224:8x3x224x224")
        name = m.group("name").strip()
        parts = m.group("dims").split(":")
        if len(parts) not in (1, 3):
            raise OptionsError(f"bad --input-shape {spec!r}: give one shape or three (min:opt:max), not {len(parts)}")
        try:
            shapes = [parse_shape(p) for p in parts]
        except OptionsError as e:
            raise OptionsError(f"bad --input-shape {spec!r}: {e}") from None
        if name in out:
            raise OptionsError(f"--input-shape given twice for {name!r}")
        if len(shapes) == 1:
            out[name] = ShapeProfile.fixed(shapes[0])
            continue
        lo, opt, hi = shapes
        if not len(lo) == len(opt) == len(hi):
            raise OptionsError(f"bad --input-shape {spec!r}: min, opt and max have different ranks")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise OptionsError(f"bad --input-shape {spec!r}: need min <= opt <= max in every dim")
        out[name] = ShapeProfile(lo, opt, hi)
    return out


def profile_problems(model: onnx.ModelProto, profiles: dict[str, ShapeProfile]) -> list[tuple[str, str, str]]:
    """What is wrong with ``profiles`` for ``model``: ``(input name, code, message)`` triples.

    Codes: ``UNKNOWN_INPUT`` (a profile for no input), ``DYNAMIC_NO_PROFILE`` (a dynamic input without a profile),
    ``PROFILE_MISMATCH`` (rank differs, or a dim the model fixes is given another value).
    """
    from onnxopt.shapes import graph_inputs

    specs = graph_inputs(model)
    names = {s.name for s in specs}
    problems = [
        (n, "UNKNOWN_INPUT", f"--input-shape names {n!r}, which is not a graph input (inputs: {', '.join(sorted(names))})")
        for n in sorted(set(profiles) - names)
    ]
    for s in specs:
        p = profiles.get(s.name)
        if p is None:
            if not s.is_static:
                dims = "x".join(str(d if isinstance(d, int) else (d or "?")) for d in s.shape)
                problems.append((s.name, "DYNAMIC_NO_PROFILE",
                                 f"input {s.name!r} has dynamic dims [{dims}] and no profile; "
                                 f"give --input-shape {s.name}=MIN:OPT:MAX"))
            continue
        if len(p.opt) != len(s.shape):
            problems.append((s.name, "PROFILE_MISMATCH",
                             f"--input-shape {s.name}: rank {len(p.opt)} but the input has rank {len(s.shape)}"))
            continue
        for i, have in enumerate(s.shape):
            if isinstance(have, int) and not (p.min[i] == p.opt[i] == p.max[i] == have):
                problems.append((s.name, "PROFILE_MISMATCH",
                                 f"--input-shape {s.name}: dim {i} is fixed to {have} in the model, got {p}"))
                break
    return problems


def resolve_profiles(model: onnx.ModelProto, profiles: dict[str, ShapeProfile]) -> dict[str, ShapeProfile]:
    """A profile for every graph input (static inputs get a fixed one); raises OptionsError on any problem."""
    from onnxopt.shapes import graph_inputs

    problems = profile_problems(model, profiles)
    if problems:
        raise OptionsError("; ".join(msg for _, _, msg in problems))
    return {s.name: profiles.get(s.name) or ShapeProfile.fixed(tuple(s.shape)) for s in graph_inputs(model)}  # type: ignore[arg-type]


# -- sizes and files -----------------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"2G"``, ``"512MiB"``, ``"1048576"`` -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise OptionsError(f"bad size {text!r}: expected bytes or a number with K, M, G or T (e.g. 2G, 512M)")
    value = float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_")
    if value < 1 or value != int(value):
        raise OptionsError(f"bad size {text!r}: must be a positive whole number of bytes")
    return int(value)


def atomic_write_bytes(path: str | os.PathLike, data: Any, *, protect: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write ``data`` (bytes or any buffer, e.g. TensorRT's IHostMemory) to ``path`` atomically
    (see :func:`onnxopt.model.atomic_output`). ``protect``: paths never to overwrite (the input model)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(memoryview(data))

    return atomic_output(path, write, protect=protect)


# -- latency -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of one inference, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    warmup: int

    def as_dict(self) -> dict[str, float | int]:
        from dataclasses import asdict

        return asdict(self)


def measure_latency(fn: Callable[[], Any], *, warmup: int = 5, repeats: int = 20) -> LatencyStats:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed one by one."""
    if repeats < 1 or warmup < 0:
        raise OptionsError("latency needs repeats >= 1 and warmup >= 0")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    p90 = times[min(len(times) - 1, int(np.ceil(0.9 * len(times))) - 1)]
    return LatencyStats(statistics.median(times), p90, statistics.fmean(times), times[0], times[-1], repeats, warmup)


# -- the interface -------------------------------------------------------------------------------------------------

@dataclass
class BuildOptions:
    """Options for :meth:`Backend.build`. Back-ends ignore what does not apply to them (and say so in the docs).

    Attributes:
        output: where to write the artifact (None: keep it in memory / in a temporary folder).
        profiles: input shape profiles (``--input-shape``); fixed shapes for back-ends without profiles.
        workspace: TensorRT builder workspace limit in bytes (None: TensorRT's default, the device memory).
        timing_cache: TensorRT timing cache file, read if present and written back after the build.
        fp16: build in half precision where the runtime offers it as a build option.
        threads: CPU threads for inference (None: the runtime's default).
        protect: paths the artifact must never overwrite (the input model).
    """

    output: Path | None = None
    profiles: dict[str, ShapeProfile] = field(default_factory=dict)
    workspace: int | None = None
    timing_cache: Path | None = None
    fp16: bool = False
    threads: int | None = None
    protect: tuple[Path, ...] = ()


@dataclass
class Artifact:
    """A built model: a file (``path``) and/or an in-memory object (``obj``), with what the build learned."""

    backend: str
    path: Path | None = None
    obj: Any = None
    info: dict[str, Any] = field(default_factory=dict)


class Runner(ABC):
    """Runs a built artifact on numpy inputs."""

    @property
    @abstractmethod
    def output_names(self) -> list[str]:
        """Names of the outputs :meth:`run` returns, in graph order."""

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference: input name -> array in, output name -> array out."""

    def latency(self, feeds: dict[str, np.ndarray], *, warmup: int = 5, repeats: int = 20) -> LatencyStats:
        """Median/p90 of ``repeats`` timed runs after ``warmup`` untimed ones (host-to-host, copies included)."""
        return measure_latency(lambda: self.run(feeds), warmup=warmup, repeats=repeats)


class Backend(ABC):
    """A deployment runtime. Subclasses set ``name`` and implement the three methods."""

    name: ClassVar[str]
    #: default file suffix of the artifact this back-end writes
    suffix: ClassVar[str] = ""

    @classmethod
    @abstractmethod
    def available(cls) -> tuple[bool, str]:
        """(True, version) when the runtime can be used here, else (False, why and how to install it)."""

    @abstractmethod
    def build(self, model: onnx.ModelProto | str | os.PathLike, options: BuildOptions | None = None) -> Artifact:
        """Compile ``model`` for this runtime; write the artifact to ``options.output`` when given."""

    @abstractmethod
    def runner(self, artifact: Artifact | str | os.PathLike, options: BuildOptions | None = None) -> Runner:
        """A runner for a built artifact (or an artifact file written earlier)."""


def model_bytes_or_path(model: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto | None, Path | None]:
    """Split the ``model`` argument of :meth:`Backend.build` into (proto or None, path or None)."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    p = Path(model)
    if not p.is_file():
        raise OptionsError(f"{p}: no such model file")
    return None, p


def load_model_arg(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """The proto for a ``model`` argument (loaded and checked when it is a path)."""
    if isinstance(model, onnx.ModelProto):
        return model
    from onnxopt.model import load

    return load(model)
