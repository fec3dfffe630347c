"""TensorRT back-end: ONNX -> serialized engine, and a runner for engines.

Written against the TensorRT 10 Python API (tensorrt 10.x, as documented in the TensorRT 10 Python API reference);
every TensorRT call below is named with the version that introduced or changed it where that matters:

* ``trt.Builder(logger).create_network(flags)``: TensorRT 10 networks are always explicit-batch (the EXPLICIT_BATCH
  flag is deprecated and ignored), so the only flag used is ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
  (TensorRT >= 9.1): tensor types come from the graph, and QDQ models are built with explicit quantization only.
  TensorRT 11 removes the FP16/INT8 builder flags and the implicit (calibrator) INT8 path; onnxopt never uses the INT8
  flag or a calibrator. ``--fp16`` sets ``BuilderFlag.FP16`` on a weakly typed network only while the API still has it;
  otherwise (and always for QDQ models) the user is told to convert the graph with ``-p convert-precision:to=fp16``.
* ``trt.OnnxParser(network, logger).parse_from_file(path)``; every error is reported through
  ``parser.num_errors`` / ``parser.get_error(i)`` (``IParserError.desc()/node()/node_name()/node_operator()/code()``;
  ``node_name``/``node_operator`` exist since TensorRT 8.6).
* ``IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)`` (TensorRT >= 8.4);
  ``builder.create_optimization_profile()`` + ``IOptimizationProfile.set_shape(name, min, opt, max)`` +
  ``config.add_optimization_profile``; ``config.create_timing_cache(bytes)`` / ``set_timing_cache(cache,
  ignore_mismatch=False)`` / ``get_timing_cache().serialize()``; ``builder.build_serialized_network(network, config)``
  (returns ``IHostMemory`` or None).
* ``trt.Runtime(logger).deserialize_cuda_engine(bytes)``; ``engine.num_io_tensors`` / ``get_tensor_name(i)`` /
  ``get_tensor_mode(name)`` / ``get_tensor_dtype(name)`` (TensorRT >= 8.5, the only I/O API in 10);
  ``IExecutionContext.set_input_shape`` / ``get_tensor_shape`` / ``set_tensor_address`` / ``execute_async_v3(stream)``
  (TensorRT >= 8.5; ``execute_async_v2`` and bindings are gone in 10).

Device memory and copies go through pycuda when it is installed, else through cuda-python's runtime bindings
(``cuda.bindings.runtime``, or ``cuda.cudart`` in cuda-python < 12.6).

Nothing here needs TensorRT at import time: argument and profile handling, engine paths and error formatting are
plain Python and are tested without a GPU.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt.backends.base import (
    Artifact, Backend, BuildOptions, Runner, ShapeProfile, atomic_write_bytes, load_model_arg, resolve_profiles,
)
from onnxopt.errors import OnnxoptError, OptionsError
from onnxopt.model import check_output_path

MIN_TRT_MAJOR = 10
INSTALL_HINT = (
    "TensorRT is not installed; it needs an NVIDIA GPU and NVIDIA's package index: "
    "pip install --extra-index-url https://pypi.nvidia.com 'onnxopt[trt]'"
)
CUDA_HINT = "the TensorRT runner needs pycuda or cuda-python for device memory: pip install pycuda (or: pip install cuda-python)"
FP16_CONVERT_HINT = "convert the graph first: onnxopt run MODEL -p convert-precision:to=fp16 -o MODEL.fp16.onnx, then build that"


# -- no-GPU helpers (tested without TensorRT) ----------------------------------------------------------------------

def import_tensorrt():
    """``import tensorrt`` with a one-line error saying how to install it, and a version check (10+)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise OnnxoptError(INSTALL_HINT) from e
    version = getattr(trt, "__version__", "0")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TRT_MAJOR:
        raise OnnxoptError(f"TensorRT {version} is too old: onnxopt needs TensorRT {MIN_TRT_MAJOR} or newer")
    return trt


def available() -> tuple[bool, str]:
    try:
        trt = import_tensorrt()
    except OnnxoptError as e:
        return False, str(e)
    return True, f"tensorrt {trt.__version__}"


def engine_path(output: str | os.PathLike | None, model_path: str | os.PathLike | None) -> Path:
    """Where to write the engine: ``output``, or ``MODEL.engine`` beside the model. Refuses the model itself,
    ``.onnx`` targets, folders and missing folders."""
    if output is None:
        if model_path is None:
            raise OptionsError("give -o ENGINE: the model has no file name to derive the engine's from")
        out = Path(model_path).with_suffix(".engine")
    else:
        out = Path(output)
    if out.suffix.lower() == ".onnx":
        raise OptionsError(f"-o {out}: an engine is not an ONNX model; use a .engine or .plan file name")
    check_output_path(out, protect=(model_path,) if model_path is not None else ())
    return out


def precision_plan(*, fp16: bool, has_qdq: bool, has_fp16_flag: bool) -> tuple[bool, bool]:
    """(strongly_typed, set_fp16_flag) for a build; raises OptionsError where the request cannot be honoured.

    Strongly typed by default: precisions come from the graph (FP32 graphs build in FP32, QDQ graphs with explicit
    quantization). ``--fp16`` uses the FP16 builder flag on a weakly typed network while TensorRT still has it
    (removed in TensorRT 11); QDQ models must stay strongly typed, so they need an FP16 graph instead.
    """
    if not fp16:
        return True, False
    if has_qdq:
        raise OptionsError("--fp16 with a QDQ model: QDQ models are built as strongly typed networks, which take "
                           "their precision from the graph; " + FP16_CONVERT_HINT)
    if not has_fp16_flag:
        raise OptionsError("this TensorRT has no FP16 builder flag (removed in TensorRT 11); " + FP16_CONVERT_HINT)
    return False, True


def format_parser_error(err: Any) -> str:
    """One line for a TensorRT ``IParserError``: node, operator, description, error code."""

    def get(attr: str) -> Any:
        fn = getattr(err, attr, None)
        try:
            return fn() if callable(fn) else None
        except Exception:  # noqa: BLE001 - best effort on old parsers
            return None

    node_name, node_index, op = get("node_name"), get("node"), get("node_operator")
    where = f"node {node_name!r}" if node_name else (f"node #{node_index}" if isinstance(node_index, int) and node_index >= 0 else "model")
    if op:
        where += f" ({op})"
    desc = str(get("desc") or "unknown error").strip().replace("\n", " ")
    code = get("code")
    code_name = getattr(code, "name", None) or (str(code).split(".")[-1] if code is not None else "")
    return f"{where}: {desc}" + (f" [{code_name}]" if code_name else "")


def parser_errors_message(errors: list[str]) -> str:
    n = len(errors)
    if n == 0:
        return "TensorRT's ONNX parser failed without reporting an error"
    return f"TensorRT's ONNX parser reported {n} error{'s' if n != 1 else ''}: " + "; ".join(
        f"({i + 1}) {e}" for i, e in enumerate(errors))


def read_timing_cache(path: Path | None) -> bytes:
    """The timing cache's bytes, or b"" for a new cache. A path that is a folder or unreadable is an error."""
    if path is None or not Path(path).exists():
        return b""
    p = Path(path)
    if not p.is_file():
        raise OptionsError(f"--timing-cache {p}: not a file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise OptionsError(f"--timing-cache {p}: cannot read: {e.strerror or e}") from e


def dynamic_profiles(model: onnx.ModelProto, profiles: dict[str, ShapeProfile]) -> dict[str, ShapeProfile]:
    """The profiles TensorRT needs: one per input with a dynamic dim (checked: none missing, ranks and fixed dims)."""
    from onnxopt.shapes import graph_inputs

    resolved = resolve_profiles(model, profiles)
    return {s.name: resolved[s.name] for s in graph_inputs(model) if not s.is_static}


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


# -- build ---------------------------------------------------------------------------------------------------------

def _logger(trt):
    """An ``ILogger`` that keeps errors (for the error message) and prints warnings to stderr."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):  # noqa: D401 - TensorRT callback
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg).strip())
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR,
                            trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return _Logger()


class TensorRTBackend(Backend):
    """NVIDIA TensorRT 10+: strongly typed networks (explicit quantization), profiles, timing cache."""

    name = "tensorrt"
    suffix = ".engine"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return available()

    def build(self, model, options: BuildOptions | None = None) -> Artifact:
        options = options or BuildOptions()
        proto = load_model_arg(model)
        model_path = None if isinstance(model, onnx.ModelProto) else Path(model)
        profiles = dynamic_profiles(proto, options.profiles)  # before importing TensorRT: errors need no GPU
        trt = import_tensorrt()
        strongly_typed, fp16_flag = precision_plan(
            fp16=options.fp16, has_qdq=has_qdq(proto), has_fp16_flag=hasattr(trt.BuilderFlag, "FP16"))
        cache_bytes = read_timing_cache(options.timing_cache)

        logger = _logger(trt)
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        with tempfile.TemporaryDirectory(prefix="onnxopt-trt-") as d:
            if model_path is None:  # parse_from_file resolves external data beside the file
                from onnxopt.model import EXTERNAL_DATA_THRESHOLD, _write, tensor_bytes

                model_path = Path(d) / "model.onnx"
                _write(proto, model_path, external=tensor_bytes(proto) >= EXTERNAL_DATA_THRESHOLD)
            ok = parser.parse_from_file(str(model_path))
        if not ok or parser.num_errors:
            errors = [format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            raise OnnxoptError(parser_errors_message(errors))

        config = builder.create_builder_config()
        if options.workspace is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace))
        if fp16_flag:
            config.set_flag(trt.BuilderFlag.FP16)
        if profiles:
            profile = builder.create_optimization_profile()
            for name, p in profiles.items():
                profile.set_shape(name, p.min, p.opt, p.max)
            config.add_optimization_profile(profile)
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            detail = "; ".join(logger.errors[-3:]) or "no error message from TensorRT"
            raise OnnxoptError(f"TensorRT failed to build the engine: {detail}")
        path = None
        if options.output is not None:
            path = atomic_write_bytes(options.output, serialized, protect=options.protect)
        if options.timing_cache is not None:
            atomic_write_bytes(options.timing_cache, config.get_timing_cache().serialize())
        info = {"tensorrt": trt.__version__, "strongly_typed": strongly_typed, "fp16_flag": fp16_flag,
                "profiles": {k: str(v) for k, v in profiles.items()}}
        return Artifact(self.name, path=path, obj=bytes(memoryview(serialized)), info=info)

    def runner(self, artifact, options: BuildOptions | None = None) -> Runner:
        if isinstance(artifact, Artifact) and artifact.obj is not None:
            data = artifact.obj
        else:
            path = Path(artifact.path if isinstance(artifact, Artifact) else artifact)  # type: ignore[arg-type]
            if not path.is_file():
                raise OnnxoptError(f"{path}: no such engine file")
            data = path.read_bytes()
        return TensorRTRunner(data)


# -- run -----------------------------------------------------------------------------------------------------------

class _Cuda:
    """Device buffers, copies and a stream: pycuda when installed, else cuda-python's runtime API."""

    def __init__(self) -> None:
        try:
            import pycuda.autoinit  # noqa: F401 - creates a context on device 0
            import pycuda.driver as cuda

            self.kind = "pycuda"
            self._cuda = cuda
            self._stream = cuda.Stream()
            self.stream_handle = self._stream.handle
            return
        except ImportError:
            pass
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart  # older cuda-python
            except ImportError as e:
                raise OnnxoptError(CUDA_HINT) from e
        self.kind = "cuda-python"
        self._rt = cudart
        self._stream = self._check(cudart.cudaStreamCreate())
        self.stream_handle = int(self._stream)

    def _check(self, result):
        err, *rest = result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise OnnxoptError(f"CUDA error: {err}")
        return rest[0] if len(rest) == 1 else None

    def alloc(self, nbytes: int) -> Any:
        nbytes = max(int(nbytes), 1)
        if self.kind == "pycuda":
            return self._cuda.mem_alloc(nbytes)
        return self._check(self._rt.cudaMalloc(nbytes))

    def free(self, mem: Any) -> None:
        if self.kind == "pycuda":
            mem.free()
        else:
            self._check(self._rt.cudaFree(mem))

    def htod(self, mem: Any, host: np.ndarray) -> None:
        if self.kind == "pycuda":
            self._cuda.memcpy_htod_async(mem, host, self._stream)
        else:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._check(self._rt.cudaMemcpyAsync(mem, host.ctypes.data, host.nbytes, kind, self._stream))

    def dtoh(self, host: np.ndarray, mem: Any) -> None:
        if self.kind == "pycuda":
            self._cuda.memcpy_dtoh_async(host, mem, self._stream)
        else:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._check(self._rt.cudaMemcpyAsync(host.ctypes.data, mem, host.nbytes, kind, self._stream))

    def synchronize(self) -> None:
        if self.kind == "pycuda":
            self._stream.synchronize()
        else:
            self._check(self._rt.cudaStreamSynchronize(self._stream))


class TensorRTRunner(Runner):
    """Runs a serialized engine with ``execute_async_v3`` and tensor addresses (TensorRT 10 API)."""

    def __init__(self, engine_bytes: bytes) -> None:
        trt = import_tensorrt()
        self._trt = trt
        self.cuda = _Cuda()
        self._logger = _logger(trt)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise OnnxoptError("TensorRT cannot deserialize the engine (built by another TensorRT version or GPU?): "
                               + ("; ".join(self._logger.errors[-2:]) or "no detail"))
        self.context = self.engine.create_execution_context()
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.dtypes: dict[str, np.dtype] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input and self.engine.is_shape_inference_io(name):
                raise OnnxoptError(f"input {name!r} is a shape tensor (host memory); this runner supports device inputs only")
            try:
                self.dtypes[name] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            except TypeError as e:
                raise OnnxoptError(f"I/O tensor {name!r} has type {self.engine.get_tensor_dtype(name)}, "
                                   "which has no numpy equivalent; keep graph inputs/outputs in float32") from e
            (self.inputs if is_input else self.outputs).append(name)
        self._buffers: dict[str, tuple[Any, int]] = {}

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)

    def close(self) -> None:
        """Free the device buffers (also done when the runner is garbage-collected)."""
        for mem, _ in self._buffers.values():
            self.cuda.free(mem)
        self._buffers.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the CUDA context may already be gone
            pass

    def _device(self, name: str, nbytes: int) -> Any:
        mem, size = self._buffers.get(name, (None, 0))
        if mem is None or size < nbytes:
            if mem is not None:
                self.cuda.free(mem)
            mem = self.cuda.alloc(nbytes)
            self._buffers[name] = (mem, nbytes)
        return mem

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise OptionsError(f"missing input(s) {', '.join(missing)}; the engine takes {', '.join(self.inputs)}")
        ctx = self.context
        hosts = {}  # keeps the host arrays alive until the asynchronous copies are done
        for name in self.inputs:
            arr = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            hosts[name] = arr
            if not ctx.set_input_shape(name, arr.shape):
                raise OptionsError(f"input {name!r}: shape {list(arr.shape)} is outside the engine's profile")
            mem = self._device(name, arr.nbytes)
            self.cuda.htod(mem, arr)
            ctx.set_tensor_address(name, int(mem))
        outs: dict[str, np.ndarray] = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise OnnxoptError(f"output {name!r} has a data-dependent shape {list(shape)}; not supported by this runner")
            host = np.empty(shape, dtype=self.dtypes[name])
            mem = self._device(name, host.nbytes)
            ctx.set_tensor_address(name, int(mem))
            outs[name] = host
        if not ctx.execute_async_v3(self.cuda.stream_handle):
            raise OnnxoptError("TensorRT execute_async_v3 failed: " + ("; ".join(self._logger.errors[-2:]) or "no detail"))
        for name, host in outs.items():
            self.cuda.dtoh(host, self._buffers[name][0])
        self.cuda.synchronize()
        return outs


__all__ = [
    "TensorRTBackend", "TensorRTRunner", "engine_path", "precision_plan", "format_parser_error",
    "parser_errors_message", "read_timing_cache", "dynamic_profiles", "import_tensorrt", "INSTALL_HINT",
]
