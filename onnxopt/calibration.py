"""Calibration data: readers that stream feed dicts into a model, batch by batch.

:func:`open_calibration` turns what the user gave (``--calib X``) into a *source*: an object whose ``__iter__`` yields
feed dicts ``{input_name: array}`` with a leading batch axis, whose ``len()`` is the number of samples it yields, and
whose ``is_random`` says whether the data is synthetic (the run report flags random calibration). A source can be
iterated many times (the calibrator may read the data in several passes to bound memory); each iteration reads the data
again from disk, so memory does not grow with the number of samples.

What ``X`` may be
-----------------
``data.npz``
    Arrays whose first axis is the sample axis. Which array feeds which model input, for each input ``NAME``:

    1. an array called exactly ``NAME`` wins;
    2. else an array called ``calib_NAME``;
    3. else, for a model with a single input only: an array called ``calib_input``, or the only array of the file.

    Anything else is an error that lists the file's arrays. Labels, when present, are ``labels`` (rule 1) or
    ``calib_labels`` (rules 2-3); a held-out evaluation split, when present, is ``test_NAME`` (or ``test_input`` for a
    single-input model) with ``test_labels``. Members are memory-mapped (``np.savez``) or streamed from the zip
    (``np.savez_compressed``), never loaded whole.
``data.npy``
    One array for a single-input model, first axis = samples (memory-mapped).
``folder/``
    A folder of ``.npy``/``.npz`` files (sorted by name; each file holds one or more samples under the rules above), or
    a folder of images (``.png .jpg .jpeg .bmp .ppm .pgm .tif .tiff .webp``, needs Pillow: ``pip install
    onnxopt[images]``). Images are preprocessed by an :class:`ImagePreprocess` spec taken, field by field, from the
    ``preprocess=`` argument, else a query after the folder name (``imgs/?size=224x224&color=bgr&mean=0.485,0.456,0.406
    &std=0.229,0.224,0.225``), else a ``preprocess.json`` in the folder, else defaults derived from the model input
    (its H and W, its layout, 1 channel = grayscale, 3 = RGB, scale 1/255, mean 0, std 1).
``package.module:function``
    A Python callable (Polygraphy's data-loader habit) called with no arguments at every pass over the data; it must
    return an iterable of feed dicts, the same data each time. An attribute that is itself an iterable of feed dicts
    (a list) works too. The folder of the model and the current folder are importable.

Every array must match the model input: same rank with the first axis as the sample axis (a sample is an input slice
along axis 0), or one more leading axis (each sample is then a complete feed, used as-is). Floats are cast to the
input's dtype.

Batching: inputs with a static first dim ``B`` are fed exactly ``B`` samples at a time (a remainder smaller than ``B``
is dropped and not counted); with a dynamic first dim, ``batch_size`` samples (the last batch may be smaller).

Random data (``random=True``, ``--calib-random``) is standard normal, seeded; it is for testing a pipeline only and the
source says so with ``is_random``. It is never used unless asked for.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import struct
import sys
import zipfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx

from onnxopt.errors import OptionsError
from onnxopt.shapes import InputSpec, graph_inputs

Feeds = dict[str, np.ndarray]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
ARRAY_SUFFIXES = (".npy", ".npz")
#: Samples drawn when ``random=True`` and no ``samples`` count is given.
DEFAULT_RANDOM_SAMPLES = 32

_CALLABLE_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


# -- image preprocessing ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImagePreprocess:
    """How an image file becomes a model input sample.

    The steps, in order: convert to ``color`` (``RGB``, ``BGR`` or ``L`` for grayscale), resize to ``size`` = (H, W)
    (bilinear), to float32, multiply by ``scale``, subtract ``mean`` and divide by ``std`` (per channel, or one value
    for all), lay out as ``layout`` (``NCHW`` or ``NHWC``). ``None`` fields are derived from the model input.
    """

    size: tuple[int, int] | None = None
    layout: str | None = None
    color: str | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str) -> "ImagePreprocess":
        """From ``{"size": "224x224", "mean": "0.485,0.456,0.406", ...}`` (strings, numbers or lists)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise OptionsError(f"{where}: unknown preprocessing key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        out: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                if key == "size":
                    dims = [int(v) for v in (re.split(r"[x,]", value) if isinstance(value, str) else value)]
                    if len(dims) == 1:
                        dims = dims * 2
                    if len(dims) != 2 or min(dims) <= 0:
                        raise ValueError
                    out[key] = (dims[0], dims[1])
                elif key == "layout":
                    v = str(value).upper()
                    if v not in ("NCHW", "NHWC"):
                        raise ValueError
                    out[key] = v
                elif key == "color":
                    v = str(value).upper()
                    v = {"GRAY": "L", "GREY": "L", "GRAYSCALE": "L"}.get(v, v)
                    if v not in ("RGB", "BGR", "L"):
                        raise ValueError
                    out[key] = v
                elif key == "scale":
                    out[key] = _number(value)
                else:  # mean, std
                    items = re.split(r"[,;/ ]+", value.strip()) if isinstance(value, str) else list(
                        value if isinstance(value, (list, tuple)) else [value])
                    vals = tuple(_number(v) for v in items if str(v).strip())
                    if not vals or (key == "std" and any(v == 0 for v in vals)):
                        raise ValueError
                    out[key] = vals
            except (ValueError, TypeError, ZeroDivisionError):
                raise OptionsError(f"{where}: bad preprocessing value {key}={value!r}") from None
        return cls(**out)

    def merged(self, other: "ImagePreprocess", given: Iterable[str]) -> "ImagePreprocess":
        """This spec with the fields named in ``given`` taken from ``other``."""
        return replace(self, **{k: getattr(other, k) for k in given})


def _number(value: Any) -> float:
    if isinstance(value, str) and "/" in value:
        a, _, b = value.partition("/")
        return float(a) / float(b)
    return float(value)


# -- sources ---------------------------------------------------------------------------------------------------------

class CalibrationSource:
    """Base of the readers: rebatches the sample chunks a subclass streams into feed dicts.

    Subclasses implement :meth:`_chunks` (an iterator of ``{input: array}`` whose arrays share a leading sample axis of
    any length) and :meth:`_available` (how many samples the data holds).
    """

    is_random = False
    _single_sample_files = False  # folders: an array of the input's rank minus one is one sample

    def __init__(self, inputs: list[InputSpec], *, samples: int | None, batch_size: int,
                 transform: Callable[[Feeds], Feeds] | None = None, description: str = "") -> None:
        if samples is not None and samples < 1:
            raise OptionsError(f"calibration samples must be >= 1, got {samples}")
        if batch_size < 1:
            raise OptionsError(f"calibration batch size must be >= 1, got {batch_size}")
        self.inputs = inputs
        self.limit = samples
        self.transform = transform
        self.description = description
        static = {s.shape[0] for s in inputs if s.shape and isinstance(s.shape[0], int)}
        dynamic = any(s.shape and not isinstance(s.shape[0], int) for s in inputs)
        if len(static) > 1 or (static and dynamic):
            # Inputs disagree on the batch axis: feed complete samples one at a time.
            self._static_batch = None
            self.batch_size = 1
        elif static:
            self._static_batch = static.pop()
            self.batch_size = self._static_batch
        else:
            self._static_batch = None
            self.batch_size = batch_size
        self._count: int | None = None

    # subclasses
    def _chunks(self) -> Iterator[Feeds]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _available(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def labels(self) -> np.ndarray | None:
        """Labels of the calibration samples (same order), when the data has them."""
        return None

    def eval_split(self) -> tuple[Feeds, np.ndarray] | None:
        """A held-out (inputs, labels) split shipped with the data (``test_*`` arrays of an npz), else None."""
        return None

    # public
    def __len__(self) -> int:
        if self._count is None:
            n = self._available()
            if self.limit is not None:
                n = min(n, self.limit)
            if self._static_batch:
                n -= n % self._static_batch
            if n <= 0:
                raise OptionsError(
                    f"{self.description}: not enough calibration samples"
                    + (f" for one batch of {self._static_batch}" if self._static_batch else ""))
            self._count = n
        return self._count

    def __iter__(self) -> Iterator[Feeds]:
        return self.batches()

    def batches(self, batch_size: int | None = None) -> Iterator[Feeds]:
        """Feed dicts of ``batch_size`` samples (default: the source's); static batch dims always win."""
        bs = self._static_batch or batch_size or self.batch_size
        total = len(self)
        pending: list[Feeds] = []
        have = 0
        done = 0
        for chunk in self._checked(self._chunks()):
            if isinstance(chunk, _WholeFeed):
                if done < total:
                    done += 1
                    yield self._finish(chunk.feeds)
                continue
            n = _chunk_len(chunk)
            while n and done + have < total:
                take = min(n, bs - have, total - done - have)
                pending.append({k: v[:take] for k, v in chunk.items()})
                chunk = {k: v[take:] for k, v in chunk.items()}
                n -= take
                have += take
                if have == bs or done + have == total:
                    batch = pending[0] if len(pending) == 1 else {
                        k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
                    done += have
                    pending, have = [], 0
                    yield self._finish(batch)
            if done >= total:
                break
        if done < total:
            raise OptionsError(f"{self.description}: the data yielded {done} samples, expected {total} "
                               "(a data-loader callable must yield the same data at every call)")

    def _finish(self, feeds: Feeds) -> Feeds:
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        return self.transform(feeds) if self.transform else feeds

    def _checked(self, chunks: Iterator[Feeds]) -> Iterator[Feeds | "_WholeFeed"]:
        """Check every chunk against the model inputs: names, rank, static dims, dtype."""
        for chunk in chunks:
            if not isinstance(chunk, Mapping):
                raise OptionsError(f"{self.description}: expected feed dicts {{input name: array}}, got "
                                   f"{type(chunk).__name__}")
            missing = [s.name for s in self.inputs if s.name not in chunk]
            if missing:
                raise OptionsError(f"{self.description}: no data for input(s) {', '.join(missing)}; "
                                   f"got {', '.join(map(str, chunk)) or 'nothing'}")
            out: Feeds = {}
            whole = None
            for spec in self.inputs:
                arr = np.asarray(chunk[spec.name])
                rank = len(spec.shape)
                if rank >= 1 and arr.ndim == rank - 1 and self._single_sample_files:
                    arr = arr[None]  # one sample without its sample axis (a file per sample)
                if arr.ndim == rank + 1:
                    is_whole = True
                    dims = arr.shape[1:]
                elif arr.ndim == rank:
                    is_whole = False
                    dims = arr.shape
                else:
                    raise OptionsError(
                        f"{self.description}: array for input {spec.name!r} has shape {list(arr.shape)}; the input is "
                        f"{_fmt_shape(spec.shape)} (expected rank {rank}, first axis = samples, or rank {rank + 1})")
                check_from = 0 if is_whole else 1
                for i in range(check_from, rank):
                    want = spec.shape[i]
                    if isinstance(want, int) and dims[i] != want:
                        raise OptionsError(
                            f"{self.description}: array for input {spec.name!r} has shape {list(arr.shape)}, which does "
                            f"not fit the input {_fmt_shape(spec.shape)} (dim {i})")
                if whole is None:
                    whole = is_whole
                elif whole != is_whole:
                    raise OptionsError(f"{self.description}: arrays mix per-sample and per-feed layouts")
                out[spec.name] = _cast(arr, spec, self.description)
            if whole:
                n = {v.shape[0] for v in out.values()}
                if len(n) != 1:
                    raise OptionsError(f"{self.description}: inputs have different sample counts {sorted(n)}")
                for i in range(next(iter(n))):
                    yield _WholeFeed({k: v[i] for k, v in out.items()})
            else:
                n = {v.shape[0] for v in out.values()}
                if len(n) != 1:
                    raise OptionsError(f"{self.description}: inputs have different sample counts {sorted(n)}")
                yield out


class _WholeFeed:
    """A sample that is a complete feed (its arrays already have the model's batch axis)."""

    __slots__ = ("feeds",)

    def __init__(self, feeds: Feeds) -> None:
        self.feeds = feeds


def _chunk_len(chunk: Feeds) -> int:
    return next(iter(chunk.values())).shape[0] if chunk else 0


def _fmt_shape(shape) -> str:
    return "[" + ",".join(str(d) if d is not None else "?" for d in shape) + "]"


def _cast(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    if arr.dtype == spec.dtype:
        return arr
    ok = (np.issubdtype(spec.dtype, np.floating) and arr.dtype.kind in "fiub") or (
        np.issubdtype(spec.dtype, np.integer) and arr.dtype.kind in "iub") or (
        spec.dtype == np.bool_ and arr.dtype.kind == "b")
    if not ok:
        raise OptionsError(f"{where}: array for input {spec.name!r} is {arr.dtype}, the input is {spec.dtype}")
    return arr.astype(spec.dtype)


# -- npz / npy -------------------------------------------------------------------------------------------------------

class _NpzMember:
    """One array of an ``.npz``, streamed sample-chunk by sample-chunk from the zip (nothing loaded whole)."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        with zipfile.ZipFile(path) as z, z.open(key + ".npy") as f:
            self.shape, self.fortran, self.dtype = _read_npy_header(f)

    def _memmap(self) -> np.ndarray | None:
        """The member itself, memory-mapped, when it is stored uncompressed (``np.savez``): no copy, no read-ahead."""
        with zipfile.ZipFile(self.path) as z:
            info = z.getinfo(self.key + ".npy")
        if info.compress_type != zipfile.ZIP_STORED or self.fortran or self.dtype.hasobject or not self.shape:
            return None
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            _read_npy_header(f)
            offset = f.tell()
        if offset + int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize > self.path.stat().st_size:
            return None
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=offset, shape=self.shape)

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        mapped = self._memmap()
        if mapped is not None:
            for i in range(0, self.shape[0], rows):
                yield mapped[i:i + rows]
            return
        if self.fortran or self.dtype.hasobject or not self.shape:
            with np.load(self.path, allow_pickle=False) as d:
                arr = d[self.key]
            if not arr.shape:
                raise OptionsError(f"{self.path}: array {self.key!r} is a scalar, not samples")
            for i in range(0, arr.shape[0], rows):
                yield arr[i:i + rows]
            return
        per_row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as z, z.open(self.key + ".npy") as f:
            _read_npy_header(f)
            left = self.shape[0]
            while left > 0:
                n = min(rows, left)
                buf = f.read(n * per_row)
                if len(buf) != n * per_row:
                    raise OptionsError(f"{self.path}: array {self.key!r} is truncated")
                yield np.frombuffer(buf, dtype=self.dtype).reshape((n, *self.shape[1:]))
                left -= n

    def load(self) -> np.ndarray:
        with np.load(self.path, allow_pickle=False) as d:
            return d[self.key]


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        shape, fortran, dtype = np.lib.format._read_array_header(f, version)  # type: ignore[attr-defined]
    return tuple(shape), bool(fortran), np.dtype(dtype)


def _npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise OptionsError(f"--calib {path}: not a readable .npz ({e})") from e


def match_keys(keys: list[str], inputs: list[InputSpec], where: str) -> tuple[dict[str, str], str]:
    """Which array feeds which input (see the module doc). Returns ({input: key}, rule prefix '' or 'calib_')."""
    mapping: dict[str, str] = {}
    prefix = ""
    for spec in inputs:
        if spec.name in keys:
            mapping[spec.name] = spec.name
        elif "calib_" + spec.name in keys:
            mapping[spec.name] = "calib_" + spec.name
            prefix = "calib_"
        elif len(inputs) == 1 and "calib_input" in keys:
            mapping[spec.name] = "calib_input"
            prefix = "calib_"
        elif len(inputs) == 1 and len(keys) == 1:
            mapping[spec.name] = keys[0]
        else:
            raise OptionsError(
                f"{where}: no array for input {spec.name!r} (looked for {spec.name!r}, 'calib_{spec.name}'"
                + (", 'calib_input' or a single array" if len(inputs) == 1 else "")
                + f"); the file has {', '.join(keys) or 'no arrays'}")
    return mapping, prefix


class NpzSource(CalibrationSource):
    """An ``.npz`` with one array per input (first axis = samples), streamed from the zip."""

    def __init__(self, path: Path, inputs: list[InputSpec], **kw: Any) -> None:
        super().__init__(inputs, description=f"--calib {path}", **kw)
        self.path = path
        keys = _npz_keys(path)
        self.mapping, self.prefix = match_keys(keys, inputs, self.description)
        self.keys = keys
        self.members = {name: _NpzMember(path, key) for name, key in self.mapping.items()}
        counts = {m.shape[0] if m.shape else 0 for m in self.members.values()}
        if len(counts) != 1:
            raise OptionsError(f"{self.description}: input arrays have different sample counts {sorted(counts)}")

    def _available(self) -> int:
        return next(iter(self.members.values())).shape[0]

    def _chunks(self) -> Iterator[Feeds]:
        rows = max(self.batch_size, 64)
        iters = {name: m.chunks(rows) for name, m in self.members.items()}
        for parts in zip(*iters.values()):
            yield dict(zip(iters.keys(), parts))

    def labels(self) -> np.ndarray | None:
        key = "calib_labels" if self.prefix == "calib_" else "labels"
        if key not in self.keys:
            return None
        lab = _NpzMember(self.path, key).load()
        return lab[: len(self)] if lab.shape and lab.shape[0] >= len(self) else None

    def eval_split(self) -> tuple[Feeds, np.ndarray] | None:
        if "test_labels" not in self.keys:
            return None
        feeds: Feeds = {}
        for spec in self.inputs:
            for key in ("test_" + spec.name, "test_input" if len(self.inputs) == 1 else None):
                if key and key in self.keys:
                    feeds[spec.name] = _cast(_NpzMember(self.path, key).load(), spec, self.description)
                    break
            else:
                return None
        return feeds, _NpzMember(self.path, "test_labels").load()


class NpySource(CalibrationSource):
    """One ``.npy`` array for a single-input model (memory-mapped)."""

    def __init__(self, path: Path, inputs: list[InputSpec], **kw: Any) -> None:
        super().__init__(inputs, description=f"--calib {path}", **kw)
        if len(inputs) != 1:
            raise OptionsError(f"{self.description}: a .npy feeds a single-input model; this one has inputs "
                               f"{', '.join(s.name for s in inputs)} (use an .npz with one array per input)")
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - numpy raises several types
            raise OptionsError(f"{self.description}: not a readable .npy ({e})") from e
        if not self.array.shape:
            raise OptionsError(f"{self.description}: holds a scalar, not samples")

    def _available(self) -> int:
        return self.array.shape[0]

    def _chunks(self) -> Iterator[Feeds]:
        rows = max(self.batch_size, 64)
        for i in range(0, self.array.shape[0], rows):
            yield {self.inputs[0].name: np.asarray(self.array[i:i + rows])}


class ArrayFolderSource(CalibrationSource):
    """A folder of ``.npy``/``.npz`` files, sorted by name, each holding one or more samples."""

    def __init__(self, path: Path, files: list[Path], inputs: list[InputSpec], **kw: Any) -> None:
        super().__init__(inputs, description=f"--calib {path}", **kw)
        self.files = files
        if any(f.suffix == ".npy" for f in files) and len(inputs) != 1:
            raise OptionsError(f"{self.description}: .npy files feed a single-input model; use .npz files with one "
                               "array per input")
        self._counts: list[int] | None = None

    _single_sample_files = True

    def _file_source(self, f: Path) -> CalibrationSource:
        kw = dict(samples=None, batch_size=self.batch_size)
        return NpzSource(f, self.inputs, **kw) if f.suffix.lower() == ".npz" else NpySource(f, self.inputs, **kw)

    def _available(self) -> int:
        total = 0
        rank = len(self.inputs[0].shape)
        for f in self.files:
            src = self._file_source(f)
            shape = next(iter(src.members.values())).shape if isinstance(src, NpzSource) else src.array.shape
            # An array of the input's rank (or one more) holds shape[0] samples; one rank less is a single sample.
            total += 1 if len(shape) == rank - 1 else (shape[0] if shape else 0)
        return total

    def _chunks(self) -> Iterator[Feeds]:
        rank = len(self.inputs[0].shape)
        for f in self.files:
            src = self._file_source(f)
            if isinstance(src, NpzSource):
                if all(len(m.shape) == rank - 1 for m in src.members.values()):
                    yield {name: m.load() for name, m in src.members.items()}
                    continue
            elif src.array.ndim == rank - 1:
                yield {self.inputs[0].name: np.asarray(src.array)}
                continue
            yield from src._chunks()


class ImageFolderSource(CalibrationSource):
    """A folder of images, preprocessed by an :class:`ImagePreprocess` spec."""

    def __init__(self, path: Path, files: list[Path], inputs: list[InputSpec], spec: ImagePreprocess,
                 **kw: Any) -> None:
        super().__init__(inputs, description=f"--calib {path}", **kw)
        if len(inputs) != 1:
            raise OptionsError(f"{self.description}: an image folder feeds a single-input model; this one has inputs "
                               f"{', '.join(s.name for s in inputs)}")
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise OptionsError(f"{self.description}: reading images needs Pillow: pip install 'onnxopt[images]'") from None
        self.files = files
        self.spec = _complete_spec(spec, inputs[0], self.description)

    def _available(self) -> int:
        return len(self.files)

    def _chunks(self) -> Iterator[Feeds]:
        name = self.inputs[0].name
        for f in self.files:
            yield {name: load_image(f, self.spec)[None]}


def _complete_spec(spec: ImagePreprocess, inp: InputSpec, where: str) -> ImagePreprocess:
    shape = inp.shape
    if len(shape) != 4:
        raise OptionsError(f"{where}: images feed a rank-4 input (NCHW or NHWC); {inp.name!r} is {_fmt_shape(shape)}")
    layout = spec.layout
    if layout is None:
        if shape[1] in (1, 3):
            layout = "NCHW"
        elif shape[3] in (1, 3):
            layout = "NHWC"
        else:
            raise OptionsError(f"{where}: cannot tell the layout of input {inp.name!r} {_fmt_shape(shape)}; "
                               "give layout=NCHW or layout=NHWC")
    c, h, w = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])
    size = spec.size
    if size is None:
        if not (isinstance(h, int) and isinstance(w, int)):
            raise OptionsError(f"{where}: input {inp.name!r} has dynamic H/W; give size=HxW")
        size = (h, w)
    color = spec.color or ("L" if c == 1 else "RGB")
    channels = 1 if color == "L" else 3
    if isinstance(c, int) and c != channels:
        raise OptionsError(f"{where}: color={color} gives {channels} channel(s), input {inp.name!r} has {c}")
    for key in ("mean", "std"):
        n = len(getattr(spec, key))
        if n not in (1, channels):
            raise OptionsError(f"{where}: {key} has {n} values for {channels} channel(s)")
    return replace(spec, size=size, layout=layout, color=color)


def load_image(path: Path, spec: ImagePreprocess) -> np.ndarray:
    """One preprocessed image as float32 CHW or HWC (per ``spec.layout``); ``spec`` must be complete."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if spec.color == "L" else "RGB")
            assert spec.size is not None
            h, w = spec.size
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            x = np.asarray(im, dtype=np.float32)
    except OSError as e:
        raise OptionsError(f"--calib: cannot read image {path}: {e}") from e
    if x.ndim == 2:
        x = x[:, :, None]
    if spec.color == "BGR":
        x = x[:, :, ::-1]
    x = x * np.float32(spec.scale)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


class CallableSource(CalibrationSource):
    """Feed dicts from a ``module:function`` data loader, called anew at every pass over the data."""

    def __init__(self, spec: str, factory: Any, inputs: list[InputSpec], **kw: Any) -> None:
        super().__init__(inputs, description=f"--calib {spec}", **kw)
        self.factory = factory

    def _data(self) -> Iterable[Feeds]:
        try:
            data = self.factory() if callable(self.factory) else self.factory
        except Exception as e:  # noqa: BLE001 - user code
            raise OptionsError(f"{self.description}: the data loader raised {type(e).__name__}: {e}") from e
        if isinstance(data, Mapping):
            data = [data]
        try:
            return iter(data)
        except TypeError:
            raise OptionsError(f"{self.description}: the data loader returned {type(data).__name__}, "
                               "not an iterable of feed dicts") from None

    def _available(self) -> int:
        n = 0
        for chunk in self._checked(iter(self._data())):
            n += 1 if isinstance(chunk, _WholeFeed) else _chunk_len(chunk)
            if self.limit is not None and n >= self.limit:
                break
        return n

    def _chunks(self) -> Iterator[Feeds]:
        yield from self._data()  # type: ignore[misc]


class RandomSource(CalibrationSource):
    """Seeded standard-normal data (integers in [0, 8)); for testing pipelines only."""

    is_random = True

    def __init__(self, model: onnx.ModelProto, inputs: list[InputSpec], shapes: dict[str, tuple[int, ...]],
                 seed: int, **kw: Any) -> None:
        super().__init__(inputs, description="random calibration data", **kw)
        self.model = model
        self.seed = seed
        self.shapes = dict(shapes)
        for spec in inputs:
            if spec.name in self.shapes:
                continue
            rest = spec.shape[1:]
            if not all(isinstance(d, int) for d in rest):
                raise OptionsError(f"random calibration: input {spec.name!r} {_fmt_shape(spec.shape)} has dynamic "
                                   "dims; give them with --input-shape")

    def _available(self) -> int:
        return self.limit if self.limit is not None else DEFAULT_RANDOM_SAMPLES

    def _chunks(self) -> Iterator[Feeds]:
        from onnxopt.validate import random_inputs

        i = 0
        while True:
            overrides = {}
            for spec in self.inputs:
                if spec.name in self.shapes:
                    overrides[spec.name] = (self.batch_size, *self.shapes[spec.name][1:])
                elif not isinstance(spec.shape[0], int):
                    overrides[spec.name] = (self.batch_size, *spec.shape[1:])
            yield random_inputs(self.model, overrides, seed=self.seed + i)
            i += 1


# -- opening ---------------------------------------------------------------------------------------------------------

def _import_callable(spec: str, model_dir: Path | None) -> Any:
    module, _, attr = spec.partition(":")
    extra = [p for p in (str(Path.cwd()), str(model_dir) if model_dir else None) if p and p not in sys.path]
    sys.path[:0] = extra
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise OptionsError(f"--calib {spec}: cannot import module {module!r} ({e})") from e
    except Exception as e:  # noqa: BLE001 - user code
        raise OptionsError(f"--calib {spec}: importing {module!r} raised {type(e).__name__}: {e}") from e
    finally:
        for p in extra:
            if p in sys.path:
                sys.path.remove(p)
    if not hasattr(mod, attr):
        raise OptionsError(f"--calib {spec}: module {module!r} has no attribute {attr!r}")
    return getattr(mod, attr)


def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return arrays, images


def _preprocess_spec(folder: Path, query: str, preprocess: Any) -> ImagePreprocess:
    spec = ImagePreprocess()
    sidecar = folder / "preprocess.json"
    if sidecar.is_file():
        try:
            raw = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise OptionsError(f"{sidecar}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise OptionsError(f"{sidecar}: expected a JSON object of preprocessing keys")
        spec = spec.merged(ImagePreprocess.parse(raw, str(sidecar)), raw)
    if query:
        raw = {}
        for item in query.split("&"):
            if not item:
                continue
            k, sep, v = item.partition("=")
            if not sep:
                raise OptionsError(f"--calib {folder}?{query}: {item!r} is not key=value")
            raw[k.strip().lower()] = v.strip()
        spec = spec.merged(ImagePreprocess.parse(raw, f"--calib {folder}?{query}"), raw)
    if isinstance(preprocess, ImagePreprocess):
        spec = preprocess
    elif isinstance(preprocess, Mapping):
        spec = spec.merged(ImagePreprocess.parse(preprocess, "preprocess"), preprocess)
    return spec


def open_calibration(
    path_or_spec: str | os.PathLike | None,
    *,
    model: onnx.ModelProto,
    samples: int | None = None,
    random: bool = False,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    batch_size: int = 1,
    preprocess: ImagePreprocess | Mapping[str, Any] | Callable[[Feeds], Feeds] | None = None,
    model_dir: str | os.PathLike | None = None,
) -> CalibrationSource:
    """Open calibration data for ``model`` (see the module doc for what ``path_or_spec`` may be).

    ``samples`` caps the sample count; ``batch_size`` applies to inputs with a dynamic first dim; ``preprocess`` is an
    :class:`ImagePreprocess` (or a dict of its fields) for image folders, or a callable applied to every feed dict.
    ``random=True`` (with ``path_or_spec=None``) gives seeded random data, flagged by ``is_random``.
    """
    inputs = graph_inputs(model)
    if not inputs:
        raise OptionsError("the model has no inputs to calibrate")
    transform = preprocess if callable(preprocess) and not isinstance(preprocess, (ImagePreprocess, Mapping)) else None
    image_pre = None if transform is not None else preprocess
    kw: dict[str, Any] = dict(samples=samples, batch_size=batch_size, transform=transform)
    if path_or_spec is None:
        if not random:
            raise OptionsError("no calibration data: give --calib DATA (or --calib-random for testing)")
        return RandomSource(model, inputs, input_shapes or {}, seed, **kw)
    if random:
        raise OptionsError("give calibration data (--calib) or random calibration (--calib-random), not both")
    text = os.fspath(path_or_spec)
    raw_path, _, query = text.partition("?")
    p = Path(raw_path)
    if image_pre is not None and not p.is_dir():
        raise OptionsError(f"--calib {text}: image preprocessing applies to a folder of images only")
    if p.is_file():
        if query:
            raise OptionsError(f"--calib {text}: a query (?key=value) applies to a folder of images only")
        suffix = p.suffix.lower()
        if suffix == ".npz":
            return NpzSource(p, inputs, **kw)
        if suffix == ".npy":
            return NpySource(p, inputs, **kw)
        raise OptionsError(f"--calib {text}: expected an .npz, an .npy, a folder or module:function, got a "
                           f"{p.suffix or 'suffix-less'} file")
    if p.is_dir():
        arrays, images = _folder_files(p)
        if arrays and images:
            raise OptionsError(f"--calib {text}: the folder mixes arrays ({arrays[0].name}) and images "
                               f"({images[0].name}); keep one kind")
        if images:
            return ImageFolderSource(p, images, inputs, _preprocess_spec(p, query, image_pre), **kw)
        if query:
            raise OptionsError(f"--calib {text}: a query (?key=value) applies to a folder of images only")
        if arrays:
            return ArrayFolderSource(p, arrays, inputs, **kw)
        raise OptionsError(f"--calib {text}: the folder holds no .npy/.npz files or images")
    if _CALLABLE_RE.match(text):
        factory = _import_callable(text, Path(model_dir) if model_dir else None)
        return CallableSource(text, factory, inputs, **kw)
    raise OptionsError(f"--calib {text}: no such file or folder (and not a module:function data loader)")


__all__ = [
    "open_calibration", "CalibrationSource", "ImagePreprocess", "NpzSource", "NpySource", "ArrayFolderSource",
    "ImageFolderSource", "CallableSource", "RandomSource", "match_keys", "load_image", "DEFAULT_RANDOM_SAMPLES",
]
