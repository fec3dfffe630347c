"""ONNX Runtime (CPU) back-end: the reference every other back-end is compared with.

The "build" is an ONNX Runtime session with all graph optimizations on (deployment mode; validation elsewhere in
onnxopt uses sessions with optimizations off). Float and QDQ int8 models run as they are: ONNX Runtime fuses QDQ
groups into its int8 kernels. The artifact file, when asked for, is the ONNX model itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from onnxopt.backends.base import Artifact, Backend, BuildOptions, Runner, load_model_arg
from onnxopt.errors import OnnxoptError, first_line



class OnnxRuntimeRunner(Runner):
    def __init__(self, session) -> None:
        self.session = session
        self._outputs = [o.name for o in session.get_outputs()]

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return dict(zip(self._outputs, self.session.run(self._outputs, feeds)))
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise OnnxoptError(f"ONNX Runtime failed to run the model: {first_line(e)}") from e


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime, CPU execution provider, all graph optimizations on."""

    name = "onnxruntime"
    suffix = ".onnx"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - a core dependency
            return False, "onnxruntime is not installed: pip install onnxruntime"
        return True, f"onnxruntime {ort.__version__}"

    def _session(self, model: onnx.ModelProto | str | os.PathLike, options: BuildOptions):
        import onnxruntime as ort

        from onnxopt.model import EXTERNAL_DATA_THRESHOLD, tensor_bytes

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if options.threads:
            so.intra_op_num_threads = options.threads
        if isinstance(model, onnx.ModelProto) and tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
            from onnxopt.validate import session  # handles >2 GB protos through a temporary file

            return session(model, optimize=True)
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        try:
            return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise OnnxoptError(f"ONNX Runtime cannot load the model: {first_line(e)}") from e

    def build(self, model, options: BuildOptions | None = None) -> Artifact:
        options = options or BuildOptions()
        proto = load_model_arg(model)
        sess = self._session(proto, options)
        path = None
        if options.output is not None:
            from onnxopt.model import save

            path = save(proto, options.output, protect=options.protect)
        return Artifact(self.name, path=path, obj=sess, info={"providers": sess.get_providers()})

    def runner(self, artifact, options: BuildOptions | None = None) -> Runner:
        options = options or BuildOptions()
        if isinstance(artifact, Artifact) and artifact.obj is not None:
            return OnnxRuntimeRunner(artifact.obj)
        path = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
        if path is None or not Path(path).is_file():
            raise OnnxoptError(f"{path}: no such ONNX file")
        return OnnxRuntimeRunner(self._session(path, options))
