"""Helpers shared by the benchmarks. They are run as ``python bench/bench_x.py`` from the repo root, so this folder is
first on ``sys.path`` and they ``import _common`` (or ``from _common import ...``); importing it puts the repo root on
``sys.path`` too, so ``models`` (the zoo, the shipped data) and ``onnxopt`` come from this checkout."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn``."""
    return statistics.median(timed(fn) for _ in range(repeats))


def resnet50_file(prefix: str) -> Path:
    """The zoo ResNet-50 (batch 1, 224x224, seed 0, unfused BatchNorm) saved as ``resnet50.onnx`` in a new temporary
    folder named after ``prefix``; a benchmark writes its other files beside it (``path.parent``)."""
    import onnx

    from models.zoo import build_resnet50

    src = Path(tempfile.mkdtemp(prefix=prefix)) / "resnet50.onnx"
    onnx.save_model(build_resnet50(batch=1, height=224, width=224, seed=0), str(src))
    return src
