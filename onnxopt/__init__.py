"""onnxopt: a graph-level optimizer for exported ONNX models.

Library use::

    import onnxopt
    model = onnxopt.load("model.onnx")
    passes = [onnxopt.create_pass("fold-bn"), onnxopt.create_pass("cleanup")]
    result = onnxopt.optimize(model, passes)          # runs the PassManager, then validates with ONNX Runtime
    result.save("model.opt.onnx")                      # atomic, streamed from the graph
"""

from onnxopt.errors import (
    ModelLoadError,
    ModelSaveError,
    OnnxoptError,
    OptionsError,
    PassError,
    PreconditionError,
    RegistryError,
    ValidationError,
)
from onnxopt.model import load, save
from onnxopt.optimize import OptimizeResult, optimize
from onnxopt.pass_base import NoOptions, Pass, PassContext, PassResult, option
from onnxopt.pass_manager import PassManager, RunRecord
from onnxopt.registry import load_registry

__version__ = "0.1.0"


def create_pass(name: str, **options) -> Pass:
    """A configured pass by registry name, e.g. ``create_pass("prune-channels", ratio=0.3)``."""
    return load_registry().create(name, **options)


__all__ = [
    "load", "save", "optimize", "OptimizeResult", "Pass", "PassResult", "PassContext", "PassManager", "RunRecord",
    "NoOptions", "option", "load_registry", "create_pass", "OnnxoptError", "ModelLoadError", "ModelSaveError",
    "OptionsError", "PassError", "PreconditionError", "RegistryError", "ValidationError", "__version__",
]
