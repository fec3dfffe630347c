#!/usr/bin/env python
"""Train a small ResNet on scikit-learn's digits and export it to ONNX.

This script produces the two test artifacts used by onnxopt's tests and
benchmarks:

``digits_resnet.onnx``
    A small ResNet classifier (opset 17) with *unfused* BatchNormalization
    nodes, one per Conv, so that Conv+BN folding is exercised on a real,
    trained model (BN running statistics and affine parameters are trained,
    not the identity).

    * input  ``input``  float32 ``[N, 1, 32, 32]`` (``N`` is a dynamic batch dim)
    * output ``logits`` float32 ``[N, 10]``

    Architecture: stem Conv3x3(1->16)+BN+ReLU, then three stages of
    ``BLOCKS_PER_STAGE`` BasicBlocks with 16/32/64 channels (stride 2 at the
    start of stages 2 and 3, with a Conv1x1+BN downsample shortcut),
    GlobalAveragePool, Flatten, Linear(64->10). All convolutions have
    ``bias=False``.

``digits.npz`` (``np.savez_compressed``)
    * ``calib_input``  float32 ``[200, 1, 32, 32]`` -- calibration images
    * ``calib_labels`` int64   ``[200]``
    * ``test_input``   float32 ``[400, 1, 32, 32]`` -- held-out test images
    * ``test_labels``  int64   ``[400]``

Data and split
--------------
``sklearn.datasets.load_digits()`` gives 1797 8x8 grayscale images with
values 0..16. They are scaled to [0, 1] (divided by 16) and resized to 32x32
with bilinear interpolation (``torch.nn.functional.interpolate``,
``align_corners=False``), giving NCHW float32 tensors.

The 1797 indices are permuted once with ``numpy.random.default_rng(SPLIT_SEED)``
(``SPLIT_SEED = 0``) and cut into three disjoint parts, in this order:

* test:        the first 400 indices of the permutation
* calibration: the next 200 indices
* train:       the remaining 1197 indices

Neither the test nor the calibration images are ever used for training; the
calibration set is also disjoint from the test set.

Training is deterministic (fixed seeds, ``torch.set_num_threads(2)``,
deterministic algorithms) and takes well under three minutes on two CPU
cores.

After export the script verifies that ``onnx.checker`` accepts the model,
that it has one BatchNormalization per Conv, that ONNX Runtime (with all
graph optimizations disabled) reproduces the PyTorch logits to within 1e-4,
and prints the ONNX Runtime test accuracy.

Usage::

    python models/make_digits.py [--out-dir models]

Both outputs are written atomically (temporary file + ``os.replace``).

Requires (beyond onnx, onnxruntime, numpy): ``torch`` (CPU build) and
``scikit-learn``. The legacy TorchScript exporter (``dynamo=False``) is used,
so ``onnxscript`` is not needed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

# --------------------------------------------------------------------------
# Fixed configuration
# --------------------------------------------------------------------------
SPLIT_SEED = 0  # seed of the train/calibration/test permutation
TORCH_SEED = 0  # seed for weight init, shuffling and augmentation
NUM_THREADS = 2
N_TEST = 400
N_CALIB = 200
IMAGE_SIZE = 32
NUM_CLASSES = 10
STAGE_CHANNELS = (16, 32, 64)
BLOCKS_PER_STAGE = 1
EPOCHS = 20
BATCH_SIZE = 64
LR = 0.05
WEIGHT_DECAY = 5e-4
MAX_SHIFT = 2  # random translation (pixels) used as data augmentation
OPSET = 17
MODEL_FILE = "digits_resnet.onnx"
DATA_FILE = "digits.npz"
MAX_MODEL_BYTES = 2 * 1024 * 1024
LOGIT_TOLERANCE = 1e-4
MIN_TEST_ACCURACY = 0.97


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
def load_data() -> dict[str, np.ndarray]:
    """Load, rescale, resize and split the digits data set.

    Returns a dict with ``{train,calib,test}_{input,labels}`` arrays:
    inputs float32 ``[n, 1, 32, 32]`` in [0, 1], labels int64 ``[n]``.
    """
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8), [0, 1]
    labels = digits.target.astype(np.int64)

    x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 8, 8)
    x = F.interpolate(
        x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    x = x.clamp_(0.0, 1.0).contiguous().numpy().astype(np.float32)

    perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    test_idx = perm[:N_TEST]
    calib_idx = perm[N_TEST : N_TEST + N_CALIB]
    train_idx = perm[N_TEST + N_CALIB :]

    out = {}
    for name, idx in (("train", train_idx), ("calib", calib_idx), ("test", test_idx)):
        out[f"{name}_input"] = np.ascontiguousarray(x[idx])
        out[f"{name}_labels"] = np.ascontiguousarray(labels[idx])
    return out


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by a random integer offset in [-max_shift, max_shift].

    Pixels shifted in are zero (the background value of the digits).
    """
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet BasicBlock: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class DigitsResNet(nn.Module):
    """Small ResNet for 1x32x32 inputs: stem + 3 stages + GAP + Linear."""

    def __init__(
        self,
        channels: tuple[int, ...] = STAGE_CHANNELS,
        blocks_per_stage: int = BLOCKS_PER_STAGE,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_ch = channels[0]
        for s, out_ch in enumerate(channels):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.flatten(self.pool(x)))


# --------------------------------------------------------------------------
# Training / evaluation
# --------------------------------------------------------------------------
@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Return the float32 logits of ``model`` (in eval mode) on ``x``."""
    model.eval()
    outs = [model(torch.from_numpy(x[i : i + batch])) for i in range(0, len(x), batch)]
    return torch.cat(outs).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def train(data: dict[str, np.ndarray]) -> DigitsResNet:
    """Train the model deterministically on the train split."""
    torch.manual_seed(TORCH_SEED)
    gen = torch.Generator().manual_seed(TORCH_SEED)
    model = DigitsResNet()

    x_train = torch.from_numpy(data["train_input"])
    y_train = torch.from_numpy(data["train_labels"])
    n = len(y_train)
    steps_per_epoch = (n + BATCH_SIZE - 1) // BATCH_SIZE

    opt = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, epochs=EPOCHS, steps_per_epoch=steps_per_epoch
    )
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total_loss = 0.0
        for start in range(0, n, BATCH_SIZE):
            idx = perm[start : start + BATCH_SIZE]
            xb = random_shift(x_train[idx], MAX_SHIFT, gen)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(idx)
        if epoch % 5 == 4 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:3d}/{EPOCHS}  loss {total_loss / n:.4f}")
    model.eval()
    return model


# --------------------------------------------------------------------------
# Export / verification
# --------------------------------------------------------------------------
def _tmp_path(out_dir: Path, suffix: str) -> Path:
    """Create an empty temporary file in ``out_dir`` (same filesystem as the target)."""
    fd, name = tempfile.mkstemp(dir=out_dir, prefix=".tmp_", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp creates 0600; use normal permissions
    return Path(name)


def export_onnx(model: nn.Module, path: Path) -> None:
    """Export ``model`` to ``path`` (atomically) with BatchNorm left unfused.

    The legacy TorchScript exporter fuses Conv+BN when exporting in
    ``TrainingMode.EVAL``; ``TrainingMode.PRESERVE`` on a model already in
    eval mode exports inference-mode BatchNormalization nodes instead.
    """
    model.eval()
    dummy = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    tmp = _tmp_path(path.parent, ".onnx")
    try:
        with warnings.catch_warnings():
            # The legacy exporter is deprecated but, unlike the dynamo one, it
            # needs no onnxscript. Its constant-folding warning is about models
            # in *training* mode; ours is in eval mode, so folding is safe.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="It is recommended that constant folding")
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=True,
                export_params=True,
            )
        proto = onnx.load(str(tmp))
        materialize_shared_initializers(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def materialize_shared_initializers(proto: onnx.ModelProto) -> None:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer.

    In a BasicBlock with a downsample shortcut, ``bn2.bias`` and the shortcut
    BN's bias receive identical gradients (they are added to the same sum)
    and both start at zero, so they stay bit-identical. The exporter then
    deduplicates them into one initializer plus an ``Identity`` node. We undo
    that so every BatchNormalization reads its parameters straight from its
    own initializers, as in a typical exported CNN.
    """
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def save_npz(data: dict[str, np.ndarray], path: Path) -> None:
    """Write the calibration and test splits to ``path`` atomically."""
    arrays = {
        "calib_input": data["calib_input"].astype(np.float32),
        "calib_labels": data["calib_labels"].astype(np.int64),
        "test_input": data["test_input"].astype(np.float32),
        "test_labels": data["test_labels"].astype(np.int64),
    }
    tmp = _tmp_path(path.parent, ".npz")
    try:
        with open(tmp, "wb") as f:  # a file object keeps numpy from renaming it
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def verify(
    model_path: Path, torch_logits: np.ndarray, data: dict[str, np.ndarray]
) -> float:
    """Check the exported model; return the ONNX Runtime test accuracy."""
    proto = onnx.load(str(model_path))
    onnx.checker.check_model(proto, full_check=True)

    ops = [n.op_type for n in proto.graph.node]
    n_conv, n_bn = ops.count("Conv"), ops.count("BatchNormalization")
    print(f"nodes: {len(ops)} total, {n_conv} Conv, {n_bn} BatchNormalization")
    if "Identity" in ops:
        raise RuntimeError("unexpected Identity node in the exported graph")
    if n_conv == 0 or n_bn != n_conv:
        raise RuntimeError(f"expected one BatchNormalization per Conv, got {n_bn}/{n_conv}")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization":
            mean, var = inits[node.input[3]], inits[node.input[4]]
            if np.allclose(mean, 0.0) or np.allclose(var, 1.0):
                raise RuntimeError(f"{node.name}: BN running stats look untrained")
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset != OPSET:
        raise RuntimeError(f"expected opset {OPSET}, got {opset}")
    inp, out = proto.graph.input[0], proto.graph.output[0]
    if (inp.name, out.name) != ("input", "logits"):
        raise RuntimeError(f"unexpected I/O names {inp.name!r}, {out.name!r}")
    if inp.type.tensor_type.shape.dim[0].dim_param != "N":
        raise RuntimeError("batch dimension of 'input' is not the symbol 'N'")

    size = model_path.stat().st_size
    print(f"{model_path.name}: {size} bytes, opset {opset}, ir_version {proto.ir_version}")
    if size > MAX_MODEL_BYTES:
        raise RuntimeError(f"model is {size} bytes, limit {MAX_MODEL_BYTES}")

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        str(model_path), sess_options=so, providers=["CPUExecutionProvider"]
    )
    ort_logits = sess.run(["logits"], {"input": data["test_input"]})[0]
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    print(f"max |ORT - torch| logits on test set: {max_diff:.2e}")
    if max_diff >= LOGIT_TOLERANCE:
        raise RuntimeError(f"ORT/torch mismatch {max_diff} >= {LOGIT_TOLERANCE}")
    return accuracy(ort_logits, data["test_labels"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="directory for %s and %s (default: this script's directory)"
        % (MODEL_FILE, DATA_FILE),
    )
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)

    data = load_data()
    print(
        "split: train %d, calib %d, test %d"
        % (len(data["train_labels"]), len(data["calib_labels"]), len(data["test_labels"]))
    )

    t0 = time.perf_counter()
    model = train(data)
    print(f"training time: {time.perf_counter() - t0:.1f} s")

    train_acc = accuracy(predict(model, data["train_input"]), data["train_labels"])
    calib_acc = accuracy(predict(model, data["calib_input"]), data["calib_labels"])
    torch_test_logits = predict(model, data["test_input"])
    test_acc = accuracy(torch_test_logits, data["test_labels"])
    print(
        f"torch accuracy: train {train_acc:.4f}, calib {calib_acc:.4f}, test {test_acc:.4f}"
    )

    model_path = out_dir / MODEL_FILE
    data_path = out_dir / DATA_FILE
    export_onnx(model, model_path)
    save_npz(data, data_path)

    ort_test_acc = verify(model_path, torch_test_logits, data)
    print(f"ONNX Runtime test accuracy: {ort_test_acc:.4f}")
    print(f"{data_path.name}: {data_path.stat().st_size} bytes")
    if ort_test_acc < MIN_TEST_ACCURACY:
        raise RuntimeError(f"test accuracy {ort_test_acc:.4f} < {MIN_TEST_ACCURACY}")


if __name__ == "__main__":
    main()
