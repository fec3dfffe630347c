"""Error types. Every error a user can cause derives from :class:`OnnxoptError`.

The CLI prints an ``OnnxoptError`` as one line and exits with its ``exit_code``; anything else is a bug and is reported
as an internal error (with the traceback only under ``--debug``).
"""

from __future__ import annotations


class OnnxoptError(Exception):
    """A user-facing error: bad input, bad options, a failed check. Printed as one line."""

    exit_code = 2


class ModelLoadError(OnnxoptError):
    """The model file cannot be read, parsed or checked."""


class ModelSaveError(OnnxoptError):
    """The output cannot be written (refused path, I/O error)."""


class OptionsError(OnnxoptError):
    """Unknown pass, unknown option, or a value of the wrong type."""


class RegistryError(OnnxoptError):
    """Two passes with one name, or a plugin that does not load."""


class PreconditionError(OnnxoptError):
    """A pass's requirements are not met by the graph (e.g. dynamic shapes where static ones are needed)."""


class PassError(OnnxoptError):
    """A pass crashed or broke an invariant. The message names the pass and the passes run before it."""


class ValidationError(OnnxoptError):
    """The optimized model's outputs differ from the original's beyond the tolerances."""

    exit_code = 3


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (the type name when it has none): how errors from libraries
    (onnx, ONNX Runtime, OpenVINO) are quoted in one-line messages."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__
