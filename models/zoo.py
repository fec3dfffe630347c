"""Builders of model-zoo ONNX graphs for tests and benchmarks.

Every builder has the signature ``build_<name>(batch, height, width, seed,
num_classes) -> onnx.ModelProto`` and returns an opset-17 / IR-8 model with:

* one float32 NCHW input named ``"input"`` of static shape ``[batch, 3, H, W]``;
* seeded random weights (``np.random.default_rng(seed)``): He-normal conv
  weights (see "Initialization" below), BatchNormalization left *unfused*
  after bias-free convolutions (as in a PyTorch export) with gamma ~ U(0.5, 1.5),
  beta ~ N(0, 0.1), running mean ~ N(0, 0.1), running var ~ U(0.5, 1.5),
  epsilon 1e-5;
* every weight and constant stored as a graph initializer (no Constant
  nodes), unique dotted node names following the PyTorch module names where
  there is a PyTorch counterpart (``layer1.0.conv1``, ``features.3.conv.1.0``)
  and tensor names derived from them (``<node name>_out``).

Initialization: a conv weight is N(0, 2 / fan_in) (He-normal); when a random
BN follows, the variance is divided by that BN's expected gain
(:data:`BN_SECOND_MOMENT_GAIN`), and the conv closing a residual branch is
further scaled by 1 / (number of residual blocks in the model), as in Fixup /
zero-init-residual, so the residual stream grows by at most ~e over the whole
net. Activations therefore stay within ~0.1..10 RMS even through ResNet-50.

The models are built with ``onnx.helper`` and numpy only:

``resnet18`` / ``resnet50``
    torchvision ResNet (v1.5: stride on the 3x3 conv of the Bottleneck).
``mobilenetv2``
    torchvision MobileNetV2, width 1.0, ReLU6 as ``Clip(x, 0, 6)``; the
    classifier's Dropout is omitted (identity at inference).
``yolo``
    YOLOv8-n-style detector (Conv+BN+SiLU blocks, C2f, SPPF, PAN neck with
    nearest Resize, decoupled heads); outputs ``p3``, ``p4``, ``p5`` with
    ``64 + num_classes`` channels at strides 8, 16 and 32.
``unet``
    UNet-style segmenter (16/32/64/128 encoder, 256 bottleneck, ConvTranspose
    upsampling); output ``mask`` with ``num_classes`` channels at full
    resolution.

Command line (from the repository root)::

    python -m models.zoo --list
    python -m models.zoo resnet50 -o resnet50.onnx [--height 224 --width 224 --batch 1 --seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "OPSET",
    "IR_VERSION",
    "GraphBuilder",
    "ZOO",
    "build_resnet18",
    "build_resnet50",
    "build_mobilenetv2",
    "build_yolo",
    "build_unet",
    "save_model_atomic",
    "main",
]

OPSET = 17
IR_VERSION = 8  # opset 17 ships with IR 8; understood by every ONNX Runtime >= 1.13
BN_EPSILON = 1e-5
# Expected second-moment gain of a random inference BN: E[gamma^2] * E[1/var] for
# gamma ~ U(0.5, 1.5), var ~ U(0.5, 1.5), i.e. (13/12) * ln 3 ~= 1.19. Convs followed by
# such a BN get their He variance divided by it so conv+BN+ReLU preserves E[x^2].
BN_SECOND_MOMENT_GAIN = 13.0 / 12.0 * float(np.log(3.0))

Shape = tuple  # static tensor shape, a tuple of ints


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a convolution/pooling window along one spatial axis."""
    out = (size + 2 * pad - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"spatial size {size} too small for kernel {kernel}, stride {stride}, pad {pad}")
    return out


def _names(prefix: str, *suffixes: str) -> tuple:
    """``_names("layer1.0", "conv1", "bn1")`` -> ``("layer1.0.conv1", "layer1.0.bn1")``."""
    return tuple(f"{prefix}.{s}" for s in suffixes)


def _require_multiple(height: int, width: int, multiple: int, model: str) -> None:
    """Reject resolutions for which the skip/scale concatenations would not line up."""
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"{model}: height and width must be positive multiples of {multiple}, got {height}x{width}")


class GraphBuilder:
    """Accumulates the nodes, initializers and static shapes of one NCHW float graph.

    Layer methods take the name of an existing tensor, append the node(s)
    computing the layer, and return the name of the result tensor. Shapes are
    tracked statically so weights can be sized from the input channels and
    mismatches (e.g. a Concat of different resolutions) fail at build time.
    Node and tensor names must be unique; a duplicate raises ``ValueError``.
    """

    def __init__(self, name: str, seed: int = 0, residual_blocks: int = 0) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        # Variance factor for the conv that closes a residual branch (see module docstring).
        self.residual_init_scale = 1.0 / max(residual_blocks, 1)
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.shapes: dict = {}
        self._node_names: set = set()
        self._shared: dict = {}

    # ------------------------------------------------------------------ graph plumbing

    def _declare(self, tensor: str, shape: Sequence[int]) -> str:
        if tensor in self.shapes:
            raise ValueError(f"tensor name {tensor!r} defined twice")
        self.shapes[tensor] = tuple(int(d) for d in shape)
        return tensor

    def channels(self, tensor: str) -> int:
        """Channel count (axis 1) of ``tensor``."""
        return self.shapes[tensor][1]

    def add_input(self, name: str, shape: Sequence[int]) -> str:
        """Declare a float32 graph input of static ``shape`` (all dimensions positive)."""
        if any(int(d) < 1 for d in shape):
            raise ValueError(f"input {name!r}: dimensions must be positive, got {list(shape)}")
        self._declare(name, shape)
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def add_output(self, tensor: str) -> None:
        """Mark an existing tensor as a float32 graph output (with its static shape)."""
        self.outputs.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, list(self.shapes[tensor])))

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add ``array`` as a graph initializer called ``name``."""
        self._declare(name, array.shape)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def shared_initializer(self, name: str, array: np.ndarray) -> str:
        """Initializer reused by several nodes (Clip bounds, Resize scales); created on first use."""
        if name in self._shared:
            if not np.array_equal(self._shared[name], array):
                raise ValueError(f"shared initializer {name!r} requested with two different values")
            return name
        self._shared[name] = array
        return self.initializer(name, array)

    def node(self, op_type: str, inputs: Sequence[str], name: str, out_shapes: Sequence[Shape],
             outputs: Optional[Sequence[str]] = None, **attrs) -> list:
        """Append one node; returns its output tensor names.

        Outputs default to ``<name>_out`` (one output) or ``<name>_out<i>``.
        """
        if name in self._node_names:
            raise ValueError(f"node name {name!r} used twice")
        for tensor in inputs:
            if tensor and tensor not in self.shapes:
                raise ValueError(f"node {name!r} reads undefined tensor {tensor!r}")
        if outputs is None:
            outputs = [f"{name}_out"] if len(out_shapes) == 1 else [f"{name}_out{i}" for i in range(len(out_shapes))]
        if len(outputs) != len(out_shapes):
            raise ValueError(f"node {name!r}: {len(outputs)} output names for {len(out_shapes)} shapes")
        self._node_names.add(name)
        for tensor, shape in zip(outputs, out_shapes):
            self._declare(tensor, shape)
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs))
        return list(outputs)

    def _unary(self, op_type: str, inputs: Sequence[str], name: str, shape: Shape,
               output: Optional[str] = None, **attrs) -> str:
        """Single-output :meth:`node` with an optional explicit output name."""
        return self.node(op_type, inputs, name, [shape], None if output is None else [output], **attrs)[0]

    def build(self, doc_string: str = "") -> onnx.ModelProto:
        """Assemble the accumulated graph into an opset-17, IR-8 ``ModelProto``."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  initializer=self.initializers, doc_string=doc_string)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="onnxopt.models.zoo", producer_version="0.1.0",
                                  doc_string=doc_string)
        model.ir_version = IR_VERSION
        return model

    # ------------------------------------------------------------------ random parameters

    def he_normal(self, shape: Sequence[int], fan_in: float, gain: float = 2.0) -> np.ndarray:
        """N(0, gain / fan_in) weights (He-normal for gain 2) as float32."""
        return (self.rng.standard_normal(tuple(shape)) * np.sqrt(gain / fan_in)).astype(np.float32)

    def small_bias(self, size: int) -> np.ndarray:
        """N(0, 0.01^2) bias vector (non-zero so folding passes have something to fold)."""
        return (self.rng.standard_normal(size) * 0.01).astype(np.float32)

    # ------------------------------------------------------------------ layers

    def conv(self, x: str, out_channels: int, kernel: int, name: str, stride: int = 1,
             padding: Optional[int] = None, groups: int = 1, bias: bool = False,
             output: Optional[str] = None, gain: float = 2.0) -> str:
        """Square ``kernel`` Conv with weight ``<name>.weight`` (and ``<name>.bias``); pad defaults to k//2.

        Weights are N(0, gain / fan_in), fan_in = (C_in / groups) * k * k.
        """
        n, c, h, w = self.shapes[x]
        if c % groups or out_channels % groups:
            raise ValueError(f"{name}: channels {c}->{out_channels} not divisible by groups={groups}")
        pad = kernel // 2 if padding is None else padding
        fan_in = c // groups * kernel * kernel
        inputs = [x, self.initializer(f"{name}.weight",
                                      self.he_normal((out_channels, c // groups, kernel, kernel), fan_in, gain))]
        if bias:
            inputs.append(self.initializer(f"{name}.bias", self.small_bias(out_channels)))
        shape = (n, out_channels, _conv_out(h, kernel, stride, pad), _conv_out(w, kernel, stride, pad))
        return self._unary("Conv", inputs, name, shape, output, kernel_shape=[kernel, kernel],
                           strides=[stride, stride], pads=[pad] * 4, dilations=[1, 1], group=groups)

    def conv_transpose(self, x: str, out_channels: int, kernel: int, stride: int, name: str,
                       bias: bool = True, output: Optional[str] = None) -> str:
        """Unpadded square ConvTranspose (weight layout ``[C_in, C_out, k, k]``)."""
        n, c, h, w = self.shapes[x]
        # Each output pixel sees about c * k * k / stride^2 inputs.
        fan_in = c * kernel * kernel / (stride * stride)
        inputs = [x, self.initializer(f"{name}.weight", self.he_normal((c, out_channels, kernel, kernel), fan_in))]
        if bias:
            inputs.append(self.initializer(f"{name}.bias", self.small_bias(out_channels)))
        shape = (n, out_channels, (h - 1) * stride + kernel, (w - 1) * stride + kernel)
        return self._unary("ConvTranspose", inputs, name, shape, output, kernel_shape=[kernel, kernel],
                           strides=[stride, stride], pads=[0] * 4, dilations=[1, 1], group=1)

    def batch_norm(self, x: str, name: str, output: Optional[str] = None) -> str:
        """Inference BatchNormalization with PyTorch-named parameters under ``name``."""
        c = self.channels(x)
        rng = self.rng
        params = {
            "weight": rng.uniform(0.5, 1.5, c),
            "bias": rng.normal(0.0, 0.1, c),
            "running_mean": rng.normal(0.0, 0.1, c),
            "running_var": rng.uniform(0.5, 1.5, c),
        }
        inputs = [x] + [self.initializer(f"{name}.{k}", v.astype(np.float32)) for k, v in params.items()]
        return self._unary("BatchNormalization", inputs, name, self.shapes[x], output, epsilon=BN_EPSILON)

    def relu(self, x: str, name: str, output: Optional[str] = None) -> str:
        """Relu."""
        return self._unary("Relu", [x], name, self.shapes[x], output)

    def relu6(self, x: str, name: str, output: Optional[str] = None) -> str:
        """ReLU6 as opset-17 ``Clip(x, min, max)`` with shared scalar bound initializers."""
        lo = self.shared_initializer("relu6.min", np.array(0.0, dtype=np.float32))
        hi = self.shared_initializer("relu6.max", np.array(6.0, dtype=np.float32))
        return self._unary("Clip", [x, lo, hi], name, self.shapes[x], output)

    def silu(self, x: str, name: str, output: Optional[str] = None) -> str:
        """SiLU as ``Mul(x, Sigmoid(x))`` (nodes ``<name>.sigmoid`` and ``<name>.mul``)."""
        gate = self._unary("Sigmoid", [x], f"{name}.sigmoid", self.shapes[x])
        return self._unary("Mul", [x, gate], f"{name}.mul", self.shapes[x], output)

    def activation(self, x: str, kind: Optional[str], name: Optional[str], output: Optional[str] = None) -> str:
        """Apply activation ``kind`` ("relu", "relu6", "silu"; None = identity)."""
        if kind is None:
            return x
        layers = {"relu": self.relu, "relu6": self.relu6, "silu": self.silu}
        if kind not in layers:
            raise ValueError(f"unknown activation {kind!r}")
        return layers[kind](x, name, output)

    def conv_bn_act(self, x: str, out_channels: int, kernel: int, names: Sequence[str], stride: int = 1,
                    padding: Optional[int] = None, groups: int = 1, act: Optional[str] = "relu",
                    output: Optional[str] = None, init_scale: float = 1.0) -> str:
        """Bias-free Conv -> BatchNormalization -> activation.

        ``names`` holds the conv, BN and (when ``act`` is set) activation node names.
        The conv variance is He's, divided by :data:`BN_SECOND_MOMENT_GAIN`, times
        ``init_scale`` (pass ``residual_init_scale`` for a residual branch's last conv).
        """
        if len(names) != (3 if act else 2):
            raise ValueError(f"conv_bn_act needs {3 if act else 2} names, got {names!r}")
        y = self.conv(x, out_channels, kernel, names[0], stride=stride, padding=padding, groups=groups,
                      gain=2.0 * init_scale / BN_SECOND_MOMENT_GAIN)
        y = self.batch_norm(y, names[1], output=None if act else output)
        return self.activation(y, act, names[2] if act else None, output)

    def max_pool(self, x: str, kernel: int, stride: int, pad: int, name: str) -> str:
        """Square MaxPool."""
        n, c, h, w = self.shapes[x]
        shape = (n, c, _conv_out(h, kernel, stride, pad), _conv_out(w, kernel, stride, pad))
        return self._unary("MaxPool", [x], name, shape, kernel_shape=[kernel, kernel],
                           strides=[stride, stride], pads=[pad] * 4)

    def global_avg_pool(self, x: str, name: str) -> str:
        """GlobalAveragePool to ``[N, C, 1, 1]``."""
        n, c = self.shapes[x][:2]
        return self._unary("GlobalAveragePool", [x], name, (n, c, 1, 1))

    def flatten(self, x: str, name: str) -> str:
        """Flatten(axis=1) to ``[N, C*H*W]``."""
        shape = self.shapes[x]
        return self._unary("Flatten", [x], name, (shape[0], int(np.prod(shape[1:]))), axis=1)

    def gemm(self, x: str, out_features: int, name: str, output: Optional[str] = None) -> str:
        """Fully connected layer: ``Gemm(x, W, b, transB=1)`` with W of shape ``[out, in]``."""
        n, k = self.shapes[x]
        weight = self.initializer(f"{name}.weight", self.he_normal((out_features, k), k, gain=1.0))
        bias = self.initializer(f"{name}.bias", self.small_bias(out_features))
        return self._unary("Gemm", [x, weight, bias], name, (n, out_features), output,
                           alpha=1.0, beta=1.0, transB=1)

    def add(self, a: str, b: str, name: str, output: Optional[str] = None) -> str:
        """Element-wise Add of two same-shaped tensors (residual join)."""
        if self.shapes[a] != self.shapes[b]:
            raise ValueError(f"{name}: cannot add {self.shapes[a]} and {self.shapes[b]}")
        return self._unary("Add", [a, b], name, self.shapes[a], output)

    def concat(self, xs: Sequence[str], name: str, output: Optional[str] = None) -> str:
        """Channel Concat (axis 1); all inputs must share N, H and W."""
        first = self.shapes[xs[0]]
        for x in xs[1:]:
            s = self.shapes[x]
            if s[0] != first[0] or s[2:] != first[2:]:
                raise ValueError(f"{name}: cannot concatenate {first} with {s} along channels")
        shape = (first[0], sum(self.channels(x) for x in xs)) + first[2:]
        return self._unary("Concat", list(xs), name, shape, output, axis=1)

    def split(self, x: str, sizes: Sequence[int], name: str) -> list:
        """Channel Split with an int64 ``<name>.split`` sizes initializer (opset-13+ form)."""
        if sum(sizes) != self.channels(x):
            raise ValueError(f"{name}: split sizes {list(sizes)} do not add up to {self.channels(x)} channels")
        n, _, h, w = self.shapes[x]
        sizes_init = self.initializer(f"{name}.split", np.array(sizes, dtype=np.int64))
        return self.node("Split", [x, sizes_init], name, [(n, s, h, w) for s in sizes], axis=1)

    def upsample_nearest(self, x: str, scale: int, name: str) -> str:
        """Nearest-neighbour Resize by an integer factor via a shared ``scales`` initializer (no roi/sizes)."""
        n, c, h, w = self.shapes[x]
        scales = self.shared_initializer(f"upsample_x{scale}.scales",
                                         np.array([1.0, 1.0, scale, scale], dtype=np.float32))
        return self._unary("Resize", [x, "", scales], name, (n, c, h * scale, w * scale), mode="nearest",
                           coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    def classifier(self, x: str, num_classes: int, pool: str, flatten: str, fc: str,
                   output: str = "logits") -> str:
        """GlobalAveragePool -> Flatten -> Gemm head producing graph output ``output``."""
        y = self.gemm(self.flatten(self.global_avg_pool(x, pool), flatten), num_classes, fc, output=output)
        self.add_output(y)
        return y


# ====================================================================== ResNet


def _residual_join(g: GraphBuilder, x: str, branch: str, stride: int, prefix: str, relu_name: str) -> str:
    """``relu(branch + shortcut(x))``; shortcut is a 1x1 conv+BN ``downsample`` when shapes differ."""
    shortcut = x
    if stride != 1 or g.channels(x) != g.channels(branch):
        shortcut = g.conv_bn_act(x, g.channels(branch), 1, _names(prefix, "downsample.0", "downsample.1"),
                                 stride=stride, padding=0, act=None)
    return g.relu(g.add(branch, shortcut, f"{prefix}.add"), relu_name)


def _basic_block(g: GraphBuilder, x: str, planes: int, stride: int, prefix: str) -> str:
    """torchvision BasicBlock (expansion 1): 3x3 -> 3x3, stride on the first conv."""
    y = g.conv_bn_act(x, planes, 3, _names(prefix, "conv1", "bn1", "relu1"), stride=stride)
    y = g.conv_bn_act(y, planes, 3, _names(prefix, "conv2", "bn2"), act=None, init_scale=g.residual_init_scale)
    return _residual_join(g, x, y, stride, prefix, f"{prefix}.relu2")


def _bottleneck(g: GraphBuilder, x: str, planes: int, stride: int, prefix: str) -> str:
    """torchvision Bottleneck v1.5 (expansion 4): 1x1 -> 3x3 (strided) -> 1x1."""
    y = g.conv_bn_act(x, planes, 1, _names(prefix, "conv1", "bn1", "relu1"))
    y = g.conv_bn_act(y, planes, 3, _names(prefix, "conv2", "bn2", "relu2"), stride=stride)
    y = g.conv_bn_act(y, planes * 4, 1, _names(prefix, "conv3", "bn3"), act=None,
                      init_scale=g.residual_init_scale)
    return _residual_join(g, x, y, stride, prefix, f"{prefix}.relu3")


def _build_resnet(name: str, block: Callable, layers: Sequence[int], batch: int, height: int, width: int,
                  seed: int, num_classes: int) -> onnx.ModelProto:
    """Shared torchvision ResNet skeleton: stem, four stages of ``block``, classifier."""
    g = GraphBuilder(name, seed, residual_blocks=sum(layers))
    x = g.add_input("input", (batch, 3, height, width))
    x = g.conv_bn_act(x, 64, 7, ("conv1", "bn1", "relu"), stride=2, padding=3)
    x = g.max_pool(x, 3, 2, 1, "maxpool")
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for i in range(blocks):
            stride = 2 if stage > 1 and i == 0 else 1
            x = block(g, x, planes, stride, f"layer{stage}.{i}")
    g.classifier(x, num_classes, "avgpool", "flatten", "fc")
    return g.build(f"torchvision-style {name} ({batch}x3x{height}x{width}), random weights seed={seed}")


def build_resnet18(batch: int = 1, height: int = 224, width: int = 224, seed: int = 0,
                   num_classes: int = 1000) -> onnx.ModelProto:
    """torchvision ResNet-18 (BasicBlock x [2, 2, 2, 2]); output ``logits`` [batch, num_classes]."""
    return _build_resnet("resnet18", _basic_block, (2, 2, 2, 2), batch, height, width, seed, num_classes)


def build_resnet50(batch: int = 1, height: int = 224, width: int = 224, seed: int = 0,
                   num_classes: int = 1000) -> onnx.ModelProto:
    """torchvision ResNet-50 v1.5 (Bottleneck x [3, 4, 6, 3]); output ``logits`` [batch, num_classes]."""
    return _build_resnet("resnet50", _bottleneck, (3, 4, 6, 3), batch, height, width, seed, num_classes)


# ====================================================================== MobileNetV2

# (expansion t, output channels c, repeats n, first stride s), as in torchvision.
_MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _inverted_residual(g: GraphBuilder, x: str, out_channels: int, stride: int, expand: int, prefix: str) -> str:
    """torchvision InvertedResidual: [1x1 expand] -> 3x3 depthwise -> 1x1 linear projection (+ residual)."""
    in_channels = g.channels(x)
    hidden = in_channels * expand
    residual = stride == 1 and in_channels == out_channels
    y, layer = x, 0
    if expand != 1:
        y = g.conv_bn_act(y, hidden, 1, _names(f"{prefix}.conv.{layer}", "0", "1", "2"), act="relu6")
        layer += 1
    y = g.conv_bn_act(y, hidden, 3, _names(f"{prefix}.conv.{layer}", "0", "1", "2"), stride=stride,
                      groups=hidden, act="relu6")
    y = g.conv_bn_act(y, out_channels, 1, _names(f"{prefix}.conv", str(layer + 1), str(layer + 2)), act=None,
                      init_scale=g.residual_init_scale if residual else 1.0)
    return g.add(x, y, f"{prefix}.add") if residual else y


def build_mobilenetv2(batch: int = 1, height: int = 224, width: int = 224, seed: int = 0,
                      num_classes: int = 1000) -> onnx.ModelProto:
    """torchvision MobileNetV2 (width 1.0, Dropout omitted); output ``logits`` [batch, num_classes]."""
    residual_blocks = sum(n - 1 for _, _, n, _ in _MOBILENETV2_SETTINGS)  # first block of a stage changes shape
    g = GraphBuilder("mobilenetv2", seed, residual_blocks=residual_blocks)
    x = g.add_input("input", (batch, 3, height, width))
    x = g.conv_bn_act(x, 32, 3, _names("features.0", "0", "1", "2"), stride=2, act="relu6")
    index = 1
    for expand, channels, repeats, first_stride in _MOBILENETV2_SETTINGS:
        for i in range(repeats):
            x = _inverted_residual(g, x, channels, first_stride if i == 0 else 1, expand, f"features.{index}")
            index += 1
    x = g.conv_bn_act(x, 1280, 1, _names(f"features.{index}", "0", "1", "2"), act="relu6")
    g.classifier(x, num_classes, "avgpool", "flatten", "classifier.1")
    return g.build(f"torchvision-style mobilenet_v2 ({batch}x3x{height}x{width}), random weights seed={seed}")


# ====================================================================== YOLOv8-n style detector


def _conv_silu(g: GraphBuilder, x: str, out_channels: int, kernel: int, prefix: str, stride: int = 1,
               init_scale: float = 1.0) -> str:
    """Ultralytics ``Conv``: Conv (pad k//2, no bias) -> BN -> SiLU."""
    return g.conv_bn_act(x, out_channels, kernel, _names(prefix, "conv", "bn", "act"), stride=stride, act="silu",
                         init_scale=init_scale)


def _yolo_bottleneck(g: GraphBuilder, x: str, shortcut: bool, prefix: str) -> str:
    """Ultralytics Bottleneck with e=1.0: 3x3 -> 3x3 (+ residual Add when ``shortcut``)."""
    c = g.channels(x)
    y = _conv_silu(g, x, c, 3, f"{prefix}.cv1")
    y = _conv_silu(g, y, c, 3, f"{prefix}.cv2", init_scale=g.residual_init_scale if shortcut else 1.0)
    return g.add(x, y, f"{prefix}.add") if shortcut else y


def _c2f(g: GraphBuilder, x: str, out_channels: int, repeats: int, shortcut: bool, prefix: str) -> str:
    """C2f: 1x1 conv, Split in halves, chained bottlenecks on the last half, Concat all, 1x1 conv."""
    hidden = out_channels // 2
    y = _conv_silu(g, x, 2 * hidden, 1, f"{prefix}.cv1")
    branches = g.split(y, (hidden, hidden), f"{prefix}.split")
    for i in range(repeats):
        branches.append(_yolo_bottleneck(g, branches[-1], shortcut, f"{prefix}.m.{i}"))
    return _conv_silu(g, g.concat(branches, f"{prefix}.concat"), out_channels, 1, f"{prefix}.cv2")


def _sppf(g: GraphBuilder, x: str, out_channels: int, prefix: str) -> str:
    """SPPF: 1x1 conv, three chained MaxPool 5x5/1 pad 2, Concat of the four, 1x1 conv."""
    branches = [_conv_silu(g, x, g.channels(x) // 2, 1, f"{prefix}.cv1")]
    for i in range(1, 4):
        branches.append(g.max_pool(branches[-1], 5, 1, 2, f"{prefix}.pool{i}"))
    return _conv_silu(g, g.concat(branches, f"{prefix}.concat"), out_channels, 1, f"{prefix}.cv2")


def _pan_merge(g: GraphBuilder, x: str, skip: str, out_channels: int, prefix: str, upsample: bool) -> str:
    """One neck step: resize x (nearest x2 ``up``, or 3x3/2 conv ``down``), Concat with ``skip``, C2f."""
    if upsample:
        x = g.upsample_nearest(x, 2, f"{prefix}.up")
    else:
        x = _conv_silu(g, x, g.channels(x), 3, f"{prefix}.down", stride=2)
    return _c2f(g, g.concat([x, skip], f"{prefix}.concat"), out_channels, 1, False, f"{prefix}.c2f")


def _detect_head(g: GraphBuilder, x: str, box_channels: int, cls_channels: int, reg_max: int,
                 num_classes: int, prefix: str, output: str) -> str:
    """Decoupled YOLOv8 head for one scale: box and class branches (2 Conv blocks + biased 1x1 conv), concatenated."""
    branches = []
    for branch, hidden, out in (("box", box_channels, 4 * reg_max), ("cls", cls_channels, num_classes)):
        y = _conv_silu(g, x, hidden, 3, f"{prefix}.{branch}.0")
        y = _conv_silu(g, y, hidden, 3, f"{prefix}.{branch}.1")
        branches.append(g.conv(y, out, 1, f"{prefix}.{branch}.2", bias=True))
    y = g.concat(branches, f"{prefix}.concat", output=output)
    g.add_output(y)
    return y


# (channels, C2f depth) of the four stride-2 backbone stages (YOLOv8-n: width 0.25, depth 0.33).
_YOLO_BACKBONE_STAGES = ((32, 1), (64, 2), (128, 2), (256, 1))


def build_yolo(batch: int = 1, height: int = 320, width: int = 320, seed: int = 0,
               num_classes: int = 80) -> onnx.ModelProto:
    """YOLOv8-n-style detector; outputs ``p3``/``p4``/``p5`` [batch, 64 + num_classes, H/s, W/s], s = 8/16/32.

    Backbone widths 16/32/64/128/256 with C2f depths 1/2/2/1 and SPPF, PAN neck
    (top-down with nearest x2 Resize, bottom-up with stride-2 convs), and raw
    (un-decoded) box-distribution (4 x reg_max=16) + class logits per scale.
    """
    _require_multiple(height, width, 32, "yolo")
    g = GraphBuilder("yolo", seed, residual_blocks=sum(d for _, d in _YOLO_BACKBONE_STAGES))
    x = g.add_input("input", (batch, 3, height, width))
    x = _conv_silu(g, x, 16, 3, "backbone.stem", stride=2)                   # P1/2
    features = []                                                            # P2/4 .. P5/32
    for stage, (channels, depth) in enumerate(_YOLO_BACKBONE_STAGES, start=1):
        x = _conv_silu(g, x, channels, 3, f"backbone.stage{stage}.down", stride=2)
        x = _c2f(g, x, channels, depth, True, f"backbone.stage{stage}.c2f")
        features.append(x)
    c3, c4, c5 = features[1], features[2], _sppf(g, features[3], 256, "backbone.sppf")

    t4 = _pan_merge(g, c5, c4, 128, "neck.td4", upsample=True)             # top-down
    n3 = _pan_merge(g, t4, c3, 64, "neck.td3", upsample=True)
    n4 = _pan_merge(g, n3, t4, 128, "neck.bu4", upsample=False)            # bottom-up
    n5 = _pan_merge(g, n4, c5, 256, "neck.bu5", upsample=False)

    reg_max = 16
    box_channels = max(16, g.channels(n3) // 4, 4 * reg_max)
    cls_channels = max(g.channels(n3), min(num_classes, 100))
    for name, feature in (("p3", n3), ("p4", n4), ("p5", n5)):
        _detect_head(g, feature, box_channels, cls_channels, reg_max, num_classes, f"head.{name}", name)
    return g.build(f"YOLOv8-n-style detector ({batch}x3x{height}x{width}, {num_classes} classes), "
                   f"random weights seed={seed}")


# ====================================================================== UNet style segmenter


def _double_conv(g: GraphBuilder, x: str, out_channels: int, prefix: str) -> str:
    """(3x3 Conv -> BN -> ReLU) x 2."""
    for i in (1, 2):
        x = g.conv_bn_act(x, out_channels, 3, _names(prefix, f"conv{i}", f"bn{i}", f"relu{i}"))
    return x


def build_unet(batch: int = 1, height: int = 320, width: int = 320, seed: int = 0,
               num_classes: int = 2) -> onnx.ModelProto:
    """UNet-style segmenter; output ``mask`` [batch, num_classes, H, W] (logits).

    Encoder double-conv blocks of 16/32/64/128 channels with 2x2 MaxPool,
    256-channel bottleneck, decoder of ConvTranspose(k2, s2, bias) ->
    Concat(skip, upsampled) -> double conv, and a biased 1x1 conv head.
    """
    _require_multiple(height, width, 16, "unet")
    g = GraphBuilder("unet", seed)
    x = g.add_input("input", (batch, 3, height, width))
    widths = (16, 32, 64, 128)
    skips = []
    for level, channels in enumerate(widths, start=1):
        skips.append(_double_conv(g, x, channels, f"enc{level}"))
        x = g.max_pool(skips[-1], 2, 2, 0, f"enc{level}.pool")
    x = _double_conv(g, x, 256, "bottleneck")
    for level in range(len(widths), 0, -1):
        up = g.conv_transpose(x, widths[level - 1], 2, 2, f"dec{level}.up")
        x = _double_conv(g, g.concat([skips[level - 1], up], f"dec{level}.concat"), widths[level - 1],
                         f"dec{level}")
    g.add_output(g.conv(x, num_classes, 1, "head", bias=True, output="mask"))
    return g.build(f"UNet-style segmenter ({batch}x3x{height}x{width}, {num_classes} classes), "
                   f"random weights seed={seed}")


# ====================================================================== registry and CLI

ZOO = {
    "resnet18": build_resnet18,
    "resnet50": build_resnet50,
    "mobilenetv2": build_mobilenetv2,
    "yolo": build_yolo,
    "unet": build_unet,
}


def save_model_atomic(model: onnx.ModelProto, path: str) -> None:
    """Serialize ``model`` to a temp file next to ``path``, fsync it, then ``os.replace`` it into place."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m models.zoo NAME -o FILE [--height H --width W --batch B --seed S]`` or ``--list``."""
    parser = argparse.ArgumentParser(prog="python -m models.zoo", description="Write a model-zoo ONNX graph.")
    parser.add_argument("name", nargs="?", metavar="NAME", help="model name (see --list)")
    parser.add_argument("-o", "--output", metavar="FILE", help="where to write the .onnx model")
    parser.add_argument("--list", action="store_true", help="list the available models and exit")
    parser.add_argument("--height", type=int, help="input height (default: the model's)")
    parser.add_argument("--width", type=int, help="input width (default: the model's)")
    parser.add_argument("--batch", type=int, help="batch size (default 1)")
    parser.add_argument("--seed", type=int, help="weight RNG seed (default 0)")
    parser.add_argument("--num-classes", type=int, help="classes (default: the model's)")
    args = parser.parse_args(argv)

    if args.list:
        for name, builder in ZOO.items():
            summary = (builder.__doc__ or "").strip().splitlines()[0].replace("``", "")
            print(f"{name:12s} {summary}")
        return 0
    if args.name is None or args.output is None:
        parser.error("NAME and -o FILE are required (or use --list)")
    if args.name not in ZOO:
        parser.error(f"unknown model {args.name!r}; choose from {', '.join(ZOO)}")

    options = {"batch": args.batch, "height": args.height, "width": args.width, "seed": args.seed,
               "num_classes": args.num_classes}
    start = time.perf_counter()
    try:
        model = ZOO[args.name](**{k: v for k, v in options.items() if v is not None})
    except ValueError as exc:
        parser.error(str(exc))
    built = time.perf_counter() - start
    save_model_atomic(model, args.output)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    print(f"wrote {args.output}: {args.name} input {shape}, {len(model.graph.node)} nodes, "
          f"built in {built:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
