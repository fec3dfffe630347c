"""OpenVINO back-end (CPU): read the ONNX model, compile it for the CPU plugin, run it.

Float models compile with ``INFERENCE_PRECISION_HINT=f32`` (on CPUs with bf16/fp16 units OpenVINO would otherwise pick
a lower precision and the outputs would no longer match the float reference); ``fp16=True`` asks for ``f16``.
QDQ int8 models need nothing special: OpenVINO's ONNX front end turns each QuantizeLinear/DequantizeLinear pair into a
FakeQuantize and the CPU plugin's low-precision transformations run the quantized convolutions and matmuls in int8.
The build records how many layers the plugin runs in int8 (``info["int8_layers"]``, from the runtime model's
``runtimePrecision``), so the low-precision path can be seen, not assumed.

The artifact file is an OpenVINO IR: ``NAME.xml`` with its weights in ``NAME.bin`` beside it, both written atomically.
Written against the OpenVINO 2024+ Python API (``openvino.Core``, ``read_model``, ``compile_model``, ``save_model``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnxopt.backends.base import Artifact, Backend, BuildOptions, Runner, load_model_arg
from onnxopt.errors import OnnxoptError, OptionsError, first_line
from onnxopt.model import atomic_output

INSTALL_HINT = "pip install 'onnxopt[openvino]' (or: pip install openvino)"



def _import_openvino():
    try:
        import openvino as ov
    except ImportError as e:
        raise OnnxoptError(f"the openvino back-end needs OpenVINO, which is not installed: {INSTALL_HINT}") from e
    return ov


def compile_config(options: BuildOptions) -> dict[str, str]:
    cfg = {"INFERENCE_PRECISION_HINT": "f16" if options.fp16 else "f32", "PERFORMANCE_HINT": "LATENCY"}
    if options.threads:
        cfg["INFERENCE_NUM_THREADS"] = str(options.threads)
    return cfg


def _int8_layers(compiled) -> int:
    n = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        if "runtimePrecision" in rt and rt["runtimePrecision"].astype(str) in ("i8", "u8"):
            if "layerType" in rt and rt["layerType"].astype(str) not in ("Const", "Reorder", "Input", "Output", "Subgraph"):
                n += 1
    return n


class OpenVinoRunner(Runner):
    def __init__(self, compiled, output_names: list[str] | None = None) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        wanted = set(output_names or ())
        self._outputs = []
        for port in compiled.outputs:
            names = port.get_names()
            match = sorted(names & wanted)
            self._outputs.append(match[0] if match else port.get_any_name())

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            result = self.request.infer(feeds)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError with long messages
            raise OnnxoptError(f"OpenVINO failed to run the model: {first_line(e)}") from e
        return {name: np.asarray(result[i]) for i, name in enumerate(self._outputs)}


class OpenVinoBackend(Backend):
    """OpenVINO CPU plugin; QDQ models run in int8 through its low-precision transformations."""

    name = "openvino"
    suffix = ".xml"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import openvino as ov
        except ImportError:
            return False, f"openvino is not installed: {INSTALL_HINT}"
        return True, f"openvino {ov.__version__}"

    def _read(self, core, model: onnx.ModelProto | str | os.PathLike):
        from onnxopt.model import EXTERNAL_DATA_THRESHOLD, _write, tensor_bytes

        try:
            if not isinstance(model, onnx.ModelProto):
                return core.read_model(str(model))
            if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
                return core.read_model(model.SerializeToString())
            with tempfile.TemporaryDirectory(prefix="onnxopt-ov-") as d:
                path = Path(d) / "model.onnx"
                _write(model, path, external=True)
                return core.read_model(str(path))
        except Exception as e:  # noqa: BLE001
            raise OnnxoptError(f"OpenVINO cannot read the model: {first_line(e)}") from e

    @staticmethod
    def _reshape(ov, ov_model, options: BuildOptions) -> None:
        if not options.profiles:
            return
        shapes = {}
        for name, p in options.profiles.items():
            shapes[name] = ov.PartialShape([ov.Dimension(lo, hi) for lo, hi in zip(p.min, p.max)])
        try:
            ov_model.reshape(shapes)
        except Exception as e:  # noqa: BLE001
            raise OptionsError(f"OpenVINO cannot apply --input-shape: {first_line(e)}") from e

    def build(self, model, options: BuildOptions | None = None) -> Artifact:
        options = options or BuildOptions()
        ov = _import_openvino()
        proto = load_model_arg(model)
        if options.output is not None and Path(options.output).suffix != ".xml":
            raise OptionsError(f"-o {options.output}: an OpenVINO IR path must end in .xml (weights go to .bin beside it)")
        if options.profiles:  # names, ranks and fixed dims checked with onnxopt's messages; other inputs stay dynamic
            from onnxopt.backends.base import profile_problems

            problems = [msg for _, code, msg in profile_problems(proto, options.profiles) if code != "DYNAMIC_NO_PROFILE"]
            if problems:
                raise OptionsError("; ".join(problems))
        core = ov.Core()
        ov_model = self._read(core, proto)
        self._reshape(ov, ov_model, options)
        path = self._save(ov, ov_model, Path(options.output), options.protect) if options.output is not None else None
        try:
            compiled = core.compile_model(ov_model, "CPU", compile_config(options))
        except Exception as e:  # noqa: BLE001
            raise OnnxoptError(f"OpenVINO cannot compile the model for CPU: {first_line(e)}") from e
        info = {
            "device": "CPU",
            "precision_hint": compile_config(options)["INFERENCE_PRECISION_HINT"],
            "int8_layers": _int8_layers(compiled),
            "output_names": [o.name for o in proto.graph.output],
        }
        return Artifact(self.name, path=path, obj=compiled, info=info)

    @staticmethod
    def _save(ov, ov_model, out: Path, protect) -> Path:
        """Write NAME.xml + NAME.bin atomically (see :func:`onnxopt.model.atomic_output`)."""
        return atomic_output(out, lambda tmp: ov.save_model(ov_model, str(tmp), compress_to_fp16=False),
                             protect=protect)

    def runner(self, artifact, options: BuildOptions | None = None) -> Runner:
        options = options or BuildOptions()
        if isinstance(artifact, Artifact) and artifact.obj is not None:
            return OpenVinoRunner(artifact.obj, artifact.info.get("output_names"))
        ov = _import_openvino()
        path = Path(artifact.path if isinstance(artifact, Artifact) else artifact)  # type: ignore[arg-type]
        if not path.is_file():
            raise OnnxoptError(f"{path}: no such OpenVINO IR or ONNX file")
        core = ov.Core()
        compiled = core.compile_model(self._read(core, path), "CPU", compile_config(options))
        return OpenVinoRunner(compiled)
