"""Tests of the ``prune-channels`` pass.

* every dependency rule on a tiny graph, against a hand-pruned reference model (weights sliced in numpy here) with
  ONNX Runtime numerics, or - for exact dead-channel removal - against the unpruned model itself;
* unprunable cases (Transpose / Softmax over channels, graph outputs, unknown ops) leave their layers alone with the
  reason in the stats;
* the zoo models at ratio=0.3: checker, ONNX Runtime, input/output shapes kept, Conv/Gemm MACs equal to the value
  predicted here from the kept channel counts; target_macs on ResNet-50; dead-channel removal on ResNet-50;
* recovery: lstsq and bias correction reduce the output error of pruning.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import create_pass
from onnxopt.errors import OptionsError, PreconditionError
from onnxopt.model import check_model
from onnxopt.pass_base import PassContext
from onnxopt.pass_manager import PassManager
from onnxopt.shapes import infer_shapes, value_shapes
from onnxopt.validate import output_metrics, random_inputs, run
from tests.helpers import init, make_model, vi

F32 = TensorProto.FLOAT


# -- builders -------------------------------------------------------------------------------------------------------

class Net:
    """A tiny NCHW graph built from a dict of weights (so a reference can be built from sliced weights)."""

    def __init__(self, x_shape=(1, 3, 8, 8), opset=17):
        self.nodes, self.inits, self.x_shape, self.opset = [], [], x_shape, opset

    def const(self, name, array):
        self.inits.append(init(name, array))
        return name

    def op(self, op, inputs, name, n_out=1, **attrs):
        outs = [f"{name}_out"] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, name, x, W, bias=None, **attrs):
        w = W[name]
        k = w.shape[2]
        attrs.setdefault("pads", [k // 2] * 4)
        ins = [x, self.const(f"{name}.w", w)]
        if bias or f"{name}.b" in W:
            ins.append(self.const(f"{name}.b", W[f"{name}.b"]))
        return self.op("Conv", ins, name, **attrs)

    def bn(self, name, x, W):
        ins = [x] + [self.const(f"{name}.{p}", W[f"{name}.{p}"]) for p in ("g", "b", "m", "v")]
        return self.op("BatchNormalization", ins, name)

    def model(self, outputs):
        return make_model(self.nodes, [vi("x", list(self.x_shape))], [vi(o, None) for o in outputs], self.inits,
                          self.opset, name="net")


def conv_w(rng, out, inp, k=3):
    return (rng.standard_normal((out, inp, k, k)) / math.sqrt(inp * k * k)).astype(np.float32)


def bn_w(rng, W, name, c):
    W[f"{name}.g"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    W[f"{name}.b"] = rng.normal(0, 0.1, c).astype(np.float32)
    W[f"{name}.m"] = rng.normal(0, 0.1, c).astype(np.float32)
    W[f"{name}.v"] = rng.uniform(0.5, 1.5, c).astype(np.float32)


def weaken(W, key, idx, axis=0, factor=1e-3):
    """Make channels ``idx`` of weight ``key`` (along ``axis``) unimportant."""
    a = W[key].copy()
    sl = [slice(None)] * a.ndim
    sl[axis] = list(idx)
    a[tuple(sl)] *= factor
    W[key] = a


def keep_of(n, removed):
    return np.array([i for i in range(n) if i not in set(removed)])


def prune(model, ctx=None, **opts):
    """Run the pass through the PassManager (which enforces the pass contract and checks the result)."""
    ctx = ctx or PassContext()
    new, record = PassManager([create_pass("prune-channels", **opts)]).run(model, ctx)
    return new, record.passes[0], ctx.artifacts.get("prune-channels")


def feeds_for(model, seed=0):
    return random_inputs(model, seed=seed)


def assert_same_outputs(a, b, feeds, rtol=1e-5, atol=1e-5):
    ra, rb = run(a, feeds), run(b, feeds)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert ra[k].shape == rb[k].shape
        np.testing.assert_allclose(rb[k], ra[k], rtol=rtol, atol=atol, err_msg=k)


def init_shape(model, name):
    return tuple(next(t for t in model.graph.initializer if t.name == name).dims)


def init_array(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def inferred_shape(model, tensor):
    return value_shapes(infer_shapes(model, strict=True))[tensor]


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


# -- dependency rules against hand-pruned references ----------------------------------------------------------------

def concat_net(W):
    n = Net()
    a = n.op("Relu", [n.conv("a", "x", W)], "ra")
    b = n.op("Relu", [n.conv("b", "x", W)], "rb")
    c = n.op("Concat", [a, b], "cat", axis=1)
    n.conv("c", c, W, pads=[0, 0, 0, 0])
    return n.model(["c_out"])


def test_concat_offsets_against_hand_pruned_reference():
    rng = np.random.default_rng(0)
    W = {"a": conv_w(rng, 8, 3), "b": conv_w(rng, 8, 3), "c": conv_w(rng, 4, 16, 1),
         "c.b": rng.normal(0, 0.1, 4).astype(np.float32)}
    low_a, low_b = [1, 5], [2, 6]
    weaken(W, "a", low_a)
    weaken(W, "b", low_b)
    weaken(W, "c", low_a + [8 + i for i in low_b], axis=1)
    model = concat_net(W)
    new, rec, art = prune(model, ratio=0.25, round_to=1, recover="none")
    assert rec.changed
    ka, kb = keep_of(8, low_a), keep_of(8, low_b)
    R = dict(W, a=W["a"][ka], b=W["b"][kb], c=W["c"][:, np.concatenate([ka, 8 + kb])])
    ref = concat_net(R)
    assert init_shape(new, "a.w") == (6, 3, 3, 3) and init_shape(new, "c.w") == (4, 12, 1, 1)
    assert inferred_shape(new, "cat_out") == (1, 12, 8, 8)
    np.testing.assert_array_equal(init_array(new, "c.w"), R["c"])
    assert_same_outputs(ref, new, feeds_for(model), rtol=1e-6, atol=1e-6)
    assert rec.stats["channels"] == "a:8->6; b:8->6"
    assert rec.stats["groups_pruned"] == 2


def test_concat_dead_channels_are_removed_exactly():
    rng = np.random.default_rng(1)
    W = {"a": conv_w(rng, 8, 3), "b": conv_w(rng, 8, 3), "c": conv_w(rng, 4, 16, 1),
         "c.b": rng.normal(0, 0.1, 4).astype(np.float32)}
    W["a"][[0, 7]] = 0
    W["b"][[3]] = 0
    model = concat_net(W)
    new, rec, _ = prune(model, mode="dead")
    assert rec.kind == "exact" and rec.changed
    assert rec.stats["dead_removed"] == 3
    assert init_shape(new, "c.w") == (4, 13, 1, 1)
    assert_same_outputs(model, new, feeds_for(model))


def split_net(W, sizes):
    n = Net()
    y = n.op("Relu", [n.conv("c0", "x", W, pads=[0] * 4)], "r0")
    s0, s1 = n.op("Split", [y, n.const("split", np.array(sizes, dtype=np.int64))], "split", n_out=2, axis=1)
    a = n.conv("c1", s0, W, pads=[0] * 4)
    b = n.conv("c2", s1, W, pads=[0] * 4)
    n.op("Add", [a, b], "add")
    return n.model(["add_out"])


def test_split_sizes_follow_the_kept_channels():
    rng = np.random.default_rng(2)
    W = {"c0": conv_w(rng, 16, 3, 1), "c1": conv_w(rng, 4, 8, 1), "c2": conv_w(rng, 4, 8, 1)}
    low = [1, 9, 12]
    weaken(W, "c0", low)
    weaken(W, "c1", [1], axis=1)
    weaken(W, "c2", [1, 4], axis=1)
    model = split_net(W, [8, 8])
    new, rec, _ = prune(model, ratio=3 / 16, round_to=1, recover="none")
    keep = keep_of(16, low)
    k0, k1 = keep[keep < 8], keep[keep >= 8] - 8
    ref = split_net(dict(W, c0=W["c0"][keep], c1=W["c1"][:, k0], c2=W["c2"][:, k1]), [len(k0), len(k1)])
    split_sizes = next(numpy_helper.to_array(t) for t in new.graph.initializer
                       if t.name == node(new, "split").input[1])
    assert split_sizes.tolist() == [7, 6]
    assert_same_outputs(ref, new, feeds_for(model), rtol=1e-6, atol=1e-6)


def grouped_net(W):
    n = Net()
    y = n.conv("c0", "x", W, pads=[0] * 4)
    y = n.op("Relu", [n.conv("g", y, W, group=2)], "rg")
    n.conv("c2", y, W, pads=[0] * 4)
    return n.model(["c2_out"])


def test_grouped_conv_keeps_equal_counts_per_group():
    rng = np.random.default_rng(3)
    W = {"c0": conv_w(rng, 8, 3, 1), "g": conv_w(rng, 8, 4, 3), "c2": conv_w(rng, 4, 8, 1)}
    weaken(W, "c0", [1, 6])  # one weak input channel per conv group
    weaken(W, "g", [0, 5])  # one weak output channel per conv group
    weaken(W, "c2", [0, 5], axis=1)
    model = grouped_net(W)
    new, rec, _ = prune(model, ratio=0.25, round_to=1, recover="none")
    k_in, k_out = keep_of(8, [1, 6]), keep_of(8, [0, 5])
    g = np.concatenate([W["g"][[1, 2, 3]][:, [0, 2, 3]], W["g"][[4, 6, 7]][:, [0, 1, 3]]])
    ref = grouped_net(dict(W, c0=W["c0"][k_in], g=g, c2=W["c2"][:, k_out]))
    assert init_shape(new, "g.w") == (6, 3, 3, 3)
    assert next(a.i for a in node(new, "g").attribute if a.name == "group") == 2
    assert_same_outputs(ref, new, feeds_for(model), rtol=1e-6, atol=1e-6)


def test_grouped_conv_uneven_dead_channels_keep_the_group_structure():
    rng = np.random.default_rng(4)
    W = {"c0": conv_w(rng, 8, 3, 1), "g": conv_w(rng, 8, 4, 3), "c2": conv_w(rng, 4, 8, 1)}
    W["c0"][[0, 1, 5]] = 0  # two dead inputs in conv group 0, one in group 1: only one per group can go
    model = grouped_net(W)
    new, rec, _ = prune(model, mode="dead")
    assert rec.stats["dead_removed"] == 2 and rec.stats["dead_kept_group_structure"] == 1
    assert init_shape(new, "c0.w") == (6, 3, 1, 1) and init_shape(new, "g.w") == (8, 3, 3, 3)
    assert_same_outputs(model, new, feeds_for(model))


def depthwise_net(W, mult=1):
    n = Net()
    y = n.op("Relu", [n.bn("bn0", n.conv("c0", "x", W, pads=[0] * 4), W)], "r0")
    c = W["c0"].shape[0]
    y = n.op("Relu", [n.conv("dw", y, W, group=c)], "rdw")
    n.conv("c2", y, W, pads=[0] * 4)
    return n.model(["c2_out"])


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_conv_couples_its_input_and_output_channels(mult):
    rng = np.random.default_rng(5)
    W = {"c0": conv_w(rng, 8, 3, 1), "dw": conv_w(rng, 8 * mult, 1, 3), "dw.b": rng.normal(0, .1, 8 * mult)
         .astype(np.float32), "c2": conv_w(rng, 4, 8 * mult, 1)}
    bn_w(rng, W, "bn0", 8)
    low = [2, 7]
    low_out = [o for c in low for o in range(c * mult, (c + 1) * mult)]
    weaken(W, "c0", low)
    weaken(W, "dw", low_out)
    weaken(W, "c2", low_out, axis=1)
    model = depthwise_net(W, mult)
    new, rec, _ = prune(model, ratio=0.25, round_to=1, recover="none")
    k, ko = keep_of(8, low), keep_of(8 * mult, low_out)
    R = dict(W, c0=W["c0"][k], dw=W["dw"][ko], c2=W["c2"][:, ko], **{"dw.b": W["dw.b"][ko]})
    for p in "gbmv":
        R[f"bn0.{p}"] = W[f"bn0.{p}"][k]
    ref = depthwise_net(R, mult)
    assert next(a.i for a in node(new, "dw").attribute if a.name == "group") == 6
    assert init_shape(new, "dw.w") == (6 * mult, 1, 3, 3)
    assert_same_outputs(ref, new, feeds_for(model), rtol=1e-6, atol=1e-6)
    assert rec.stats["channels"] == "c0:8->6"  # the depthwise conv is part of c0's group, not a group of its own


def gemm_net(W, head):
    n = Net()
    y = n.op("Relu", [n.conv("c0", "x", W, strides=[2, 2])], "r0")  # [1, 8, 4, 4]
    if head == "flatten":
        y = n.op("Flatten", [y], "flat", axis=1)
    elif head == "reshape":
        y = n.op("Reshape", [y, n.const("shape", np.array([1, W["fc"].shape[1]], dtype=np.int64))], "flat")
    elif head == "reshape-1":
        y = n.op("Reshape", [y, n.const("shape", np.array([1, -1], dtype=np.int64))], "flat")
    elif head == "gap":
        y = n.op("Flatten", [n.op("GlobalAveragePool", [y], "gap")], "flat", axis=1)
    elif head == "reducemean":
        y = n.op("ReduceMean", [y, n.const("axes", np.array([2, 3], dtype=np.int64))], "flat", keepdims=0,
                 ) if n.opset >= 18 else n.op("ReduceMean", [y], "flat", axes=[2, 3], keepdims=0)
    n.op("Gemm", [y, n.const("fc.w", W["fc"]), n.const("fc.b", W["fc.b"])], "fc", transB=1)
    return n.model(["fc_out"])


@pytest.mark.parametrize("head", ["flatten", "reshape", "reshape-1", "gap", "reducemean"])
def test_flatten_reshape_pool_into_gemm(head):
    rng = np.random.default_rng(6)
    hw = 1 if head in ("gap", "reducemean") else 16
    W = {"c0": conv_w(rng, 8, 3), "fc": (rng.standard_normal((10, 8 * hw)) / 8).astype(np.float32),
         "fc.b": rng.normal(0, .1, 10).astype(np.float32)}
    low = [0, 3]
    weaken(W, "c0", low)
    cols = [c * hw + j for c in low for j in range(hw)]  # the H*W block of each channel
    weaken(W, "fc", cols, axis=1)
    model = gemm_net(W, head)
    new, rec, _ = prune(model, ratio=0.25, round_to=1, recover="none")
    k = keep_of(8, low)
    kcols = np.array([c * hw + j for c in k for j in range(hw)])
    ref = gemm_net(dict(W, c0=W["c0"][k], fc=W["fc"][:, kcols]), head)
    assert init_shape(new, "fc.w") == (10, 6 * hw)
    assert_same_outputs(ref, new, feeds_for(model), rtol=1e-6, atol=1e-6)
    if head == "reshape":
        shape = next(numpy_helper.to_array(t) for t in new.graph.initializer if t.name == node(new, "flat").input[1])
        assert shape.tolist() == [1, 6 * hw]


def residual_net(W):
    n = Net()
    r = n.op("Relu", [n.bn("bn0", n.conv("c0", "x", W), W)], "r0")
    y = n.op("Relu", [n.bn("bn1", n.conv("c1", r, W), W)], "r1")
    y = n.bn("bn2", n.conv("c2", y, W), W)
    s = n.op("Relu", [n.op("Add", [y, r], "add")], "r2")
    y = n.op("Mul", [s, n.const("scale", W["scale"])], "mul")
    y = n.op("Add", [y, n.const("shift", W["shift"])], "shift_add")
    n.conv("c3", y, W, pads=[0] * 4)
    return n.model(["c3_out"])


def residual_weights(rng):
    W = {"c0": conv_w(rng, 8, 3), "c1": conv_w(rng, 8, 8), "c2": conv_w(rng, 8, 8), "c3": conv_w(rng, 4, 8, 1),
         "scale": rng.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32),
         "shift": rng.normal(0, 0.1, (8, 1, 1)).astype(np.float32)}
    for b in ("bn0", "bn1", "bn2"):
        bn_w(rng, W, b, 8)
    return W


def test_residual_add_couples_its_producers_and_slices_per_channel_constants():
    rng = np.random.default_rng(7)
    W = residual_weights(rng)
    low_r, low_1 = [3, 6], [1, 4]
    for key in ("c0", "c2"):
        weaken(W, key, low_r)
    weaken(W, "c1", low_r, axis=1)
    weaken(W, "c3", low_r, axis=1)
    weaken(W, "c1", low_1)
    weaken(W, "c2", low_1, axis=1)
    model = residual_net(W)
    new, rec, art = prune(model, ratio=0.25, round_to=1, recover="none")
    kr, k1 = keep_of(8, low_r), keep_of(8, low_1)
    R = dict(W, c0=W["c0"][kr], c1=W["c1"][k1][:, kr], c2=W["c2"][kr][:, k1], c3=W["c3"][:, kr],
             scale=W["scale"][:, kr], shift=W["shift"][kr])
    for b, k in (("bn0", kr), ("bn1", k1), ("bn2", kr)):
        for p in "gbmv":
            R[f"{b}.{p}"] = W[f"{b}.{p}"][k]
    assert_same_outputs(residual_net(R), new, feeds_for(model), rtol=1e-6, atol=1e-6)
    groups = {g["name"]: g for g in art["groups"]}
    assert groups["c0"]["layers"] == ["c0", "c2"] and groups["c0"]["after"] == 6
    assert groups["c1"]["layers"] == ["c1"] and groups["c1"]["after"] == 6
    assert init_shape(new, "scale") == (1, 6, 1, 1) and init_shape(new, "shift") == (6, 1, 1)


def test_residual_dead_channel_needs_every_coupled_producer_dead():
    rng = np.random.default_rng(8)
    W = residual_weights(rng)
    W["c0"][[2, 5]] = 0  # dead in the first producer only: the residual sum is not constant
    W["c2"][[2]] = 0  # channel 2 dead in both producers: constant after BN/ReLU/Add, folded into c3's bias
    model = residual_net(W)
    new, rec, _ = prune(model, mode="dead")
    assert rec.stats["dead_removed"] == 1
    assert init_shape(new, "c0.w") == (7, 3, 3, 3) and init_shape(new, "c2.w") == (7, 8, 3, 3)
    assert init_shape(new, "c1.w") == (8, 7, 3, 3)
    assert rec.stats["folded_channels"] >= 1  # the nonzero constant went into c3's (new) bias
    assert_same_outputs(model, new, feeds_for(model))


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "Pad", "Resize", "ResizeSizes", "Clip", "Dropout",
                                "Identity", "LeakyRelu", "SliceSpatial", "SliceChannels", "Sigmoid", "InstanceNorm"])
def test_channel_preserving_ops_pass_dead_channels(op):
    rng = np.random.default_rng(9)
    W = {"c0": conv_w(rng, 8, 3), "c1": conv_w(rng, 4, 8, 1)}
    W["c0"][[2, 5]] = 0
    n = Net()
    y = n.op("Relu", [n.conv("c0", "x", W)], "r0")
    c_in = 8
    if op == "MaxPool":
        y = n.op("MaxPool", [y], "op", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    elif op == "AveragePool":
        y = n.op("AveragePool", [y], "op", kernel_shape=[2, 2], strides=[2, 2])
    elif op == "Pad":
        y = n.op("Pad", [y, n.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))], "op")
    elif op == "Resize":
        y = n.op("Resize", [y, "", n.const("scales", np.array([1, 1, 2, 2], dtype=np.float32))], "op",
                 mode="nearest")
    elif op == "ResizeSizes":
        y = n.op("Resize", [y, "", "", n.const("sizes", np.array([1, 8, 16, 16], dtype=np.int64))], "op",
                 mode="nearest")
    elif op == "InstanceNorm":
        y = n.op("InstanceNormalization", [y, n.const("in.s", rng.uniform(0.5, 1.5, 8).astype(np.float32)),
                                           n.const("in.b", np.zeros(8, np.float32))], "op")
    elif op == "Clip":
        y = n.op("Clip", [y, n.const("lo", np.array(0, np.float32)), n.const("hi", np.array(6, np.float32))], "op")
    elif op == "LeakyRelu":
        y = n.op("LeakyRelu", [y], "op", alpha=0.1)
    elif op == "SliceSpatial":
        y = n.op("Slice", [y, n.const("st", np.array([1], np.int64)), n.const("en", np.array([7], np.int64)),
                           n.const("ax", np.array([2], np.int64))], "op")
    elif op == "SliceChannels":
        y = n.op("Slice", [y, n.const("st", np.array([1], np.int64)), n.const("en", np.array([7], np.int64)),
                           n.const("ax", np.array([1], np.int64))], "op")
        c_in = 6
    else:
        y = n.op(op, [y], "op")
    W["c1"] = conv_w(rng, 4, c_in, 1)
    n.conv("c1", y, W, pads=[0] * 4)
    model = n.model(["c1_out"])
    new, rec, _ = prune(model, mode="dead")
    assert rec.changed and rec.stats["dead_removed"] == 2
    assert init_shape(new, "c0.w") == (6, 3, 3, 3)
    assert init_shape(new, "c1.w") == (4, c_in - 2, 1, 1)
    if op == "SliceChannels":
        st, en = (numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == node(new, "op").input[i]))
                  for i in (1, 2))
        assert (st.tolist(), en.tolist()) == ([1], [5])  # channels 1..6 minus the removed 2 and 5
    if op == "ResizeSizes":
        assert init_array(new, "sizes").tolist() == [1, 6, 16, 16]
    assert_same_outputs(model, new, feeds_for(model))


# -- unprunable cases -----------------------------------------------------------------------------------------------

def blocked_net(W):
    n = Net()
    n.op("Transpose", [n.conv("ct", "x", W)], "tr", perm=[0, 2, 3, 1])
    n.op("Softmax", [n.conv("cs", "x", W)], "sm", axis=1)
    n.conv("co", "x", W)
    y = n.op("Relu", [n.conv("cp", "x", W)], "rp")
    n.op("TopK", [n.conv("ck", "x", W), n.const("k", np.array([2], np.int64))], "topk", n_out=2, axis=1)
    n.op("Reshape", [n.conv("cr", "x", W), n.const("groups", np.array([1, 2, 4, 64], np.int64))], "shuffle")
    n.op("ReduceMean", [n.conv("cm", "x", W)], "rm", axes=[1])
    n.conv("cq", y, W, pads=[0] * 4)
    return n.model(["tr_out", "sm_out", "co_out", "cq_out", "topk_out0", "shuffle_out", "rm_out"])


def test_unprunable_groups_give_the_reason_and_stay_untouched():
    rng = np.random.default_rng(10)
    W = {k: conv_w(rng, 8, 3) for k in ("ct", "cs", "co", "cp", "ck", "cr", "cm")}
    W["cq"] = conv_w(rng, 4, 8, 1)
    model = blocked_net(W)
    new, rec, art = prune(model, ratio=0.5, round_to=1, recover="none")
    s = rec.stats
    assert s["skipped_transpose"] == 1 and s["skipped_softmax_over_channels"] == 1
    assert s["skipped_graph_output"] == 2  # co and cq feed graph outputs
    assert s["skipped_unsupported_topk"] == 1
    assert s["skipped_channel_mixing_reshape"] == 1 and s["skipped_reduction_over_channels"] == 1
    assert "Transpose 'tr' moves the channel axis" in s["unprunable"]
    assert "Softmax 'sm' normalizes over the channels" in s["unprunable"]
    assert "'co_out' is a graph output" in s["unprunable"]
    for k in ("ct", "cs", "co", "ck", "cr", "cm"):
        np.testing.assert_array_equal(init_array(new, f"{k}.w"), W[k])
    assert init_shape(new, "cp.w") == (4, 3, 3, 3) and init_shape(new, "cq.w") == (4, 4, 1, 1)
    assert rec.stats["channels"] == "cp:8->4"
    for o_old, o_new in zip(model.graph.output, new.graph.output):
        assert o_old == o_new


def test_non_constant_weight_makes_its_input_group_unprunable():
    rng = np.random.default_rng(21)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="c0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w_dyn"], ["y"], name="c1")]
    g = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", F32, [1, 3, 8, 8]),
                                         helper.make_tensor_value_info("w_dyn", F32, [4, 8, 1, 1])],
                          [helper.make_tensor_value_info("y", F32, [1, 4, 8, 8])],
                          [numpy_helper.from_array(conv_w(rng, 8, 3), "w0")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    new, rec, _ = prune(model, ratio=0.5, round_to=1)
    assert not rec.changed and rec.stats["skipped_non_constant_weight"] == 1
    assert "Conv 'c1' has a non-constant weight" in rec.stats["unprunable"]


def test_nothing_prunable_leaves_the_graph_unchanged():
    rng = np.random.default_rng(11)
    n = Net()
    n.op("Softmax", [n.conv("c", "x", {"c": conv_w(rng, 8, 3)})], "sm", axis=1)
    model = n.model(["sm_out"])
    new, rec, _ = prune(model, ratio=0.5)
    assert not rec.changed and rec.stats["skipped_nothing_prunable"] == 1
    assert new.graph == model.graph


def test_dead_mode_without_dead_channels_changes_nothing():
    model = concat_net({"a": conv_w(np.random.default_rng(0), 8, 3), "b": conv_w(np.random.default_rng(1), 8, 3),
                        "c": conv_w(np.random.default_rng(2), 4, 16, 1), "c.b": np.zeros(4, np.float32)})
    new, rec, _ = prune(model, mode="dead")
    assert not rec.changed and rec.stats["dead_removed"] == 0 and rec.stats["skipped_nothing_to_remove"] == 1


def test_dead_channel_before_a_padded_conv_with_nonzero_constant_is_kept():
    rng = np.random.default_rng(12)
    W = residual_weights(rng)
    W["c1"][[3]] = 0  # bn1 maps 0 to a nonzero constant, relu keeps it if positive, then c2 pads with zeros
    W["bn1.b"][3] = 1.0
    model = residual_net(W)
    new, rec, _ = prune(model, mode="dead")
    assert not rec.changed
    assert rec.stats["dead_kept_padded_consumer"] == 1 and "c2" in rec.stats["dead_kept"]


def test_value_info_is_reinferred_not_left_stale():
    rng = np.random.default_rng(19)
    W = residual_weights(rng)
    model = onnx.shape_inference.infer_shapes(residual_net(W))  # the input carries value_info for every tensor
    assert len(model.graph.value_info) > 10
    new, rec, _ = prune(model, ratio=0.5, round_to=1, recover="none")
    fresh = value_shapes(infer_shapes(new, strict=True))
    declared = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim) for vi in new.graph.value_info}
    assert declared and all(fresh[k] == v for k, v in declared.items())
    assert declared["add_out"] == (1, 4, 8, 8) and declared["r1_out"] == (1, 4, 8, 8)


def mlp(W):
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(W[k], k) for k in ("w1", "b1", "w2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", F32, [2, 5, 12])],
                          [helper.make_tensor_value_info("y", F32, [2, 5, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_matmul_features_on_the_last_axis():
    rng = np.random.default_rng(20)
    W = {"w1": rng.standard_normal((12, 16)).astype(np.float32), "b1": rng.normal(0, .1, 16).astype(np.float32),
         "w2": rng.standard_normal((16, 6)).astype(np.float32)}
    low = [3, 8, 9, 15]
    weaken(W, "w1", low, axis=1)
    weaken(W, "w2", low, axis=0)
    model = mlp(W)
    new, rec, _ = prune(model, ratio=0.25, round_to=1, recover="none")
    k = keep_of(16, low)
    ref = mlp({"w1": W["w1"][:, k], "b1": W["b1"][k], "w2": W["w2"][k]})
    assert rec.stats["channels"] == "fc1:16->12"
    assert_same_outputs(ref, new, feeds_for(model), rtol=1e-6, atol=1e-6)


# -- options --------------------------------------------------------------------------------------------------------

def test_round_to_min_channels_exclude_and_layer_ratio():
    rng = np.random.default_rng(13)
    W = {"a": conv_w(rng, 64, 3), "b": conv_w(rng, 64, 3), "c": conv_w(rng, 4, 128, 1),
         "c.b": np.zeros(4, np.float32)}
    model = concat_net(W)
    _, rec, _ = prune(model, ratio=0.3, recover="none")
    assert rec.stats["channels"] == "a:64->48; b:64->48"  # 64 * 0.7 = 44.8 -> a multiple of 8
    _, rec, _ = prune(model, ratio=0.3, round_to=1, recover="none")
    assert rec.stats["channels"] == "a:64->45; b:64->45"
    _, rec, _ = prune(model, ratio=0.9, min_channels=20, recover="none")
    assert rec.stats["channels"] == "a:64->24; b:64->24"
    _, rec, _ = prune(model, ratio=0.3, exclude=("a",), recover="none")
    assert rec.stats["channels"] == "b:64->48" and rec.stats["excluded"] == 1
    _, rec, _ = prune(model, ratio=0.25, layer_ratio={"b": 0.5}, recover="none")
    assert rec.stats["channels"] == "a:64->48; b:64->32"


def test_importance_criteria_pick_different_channels():
    rng = np.random.default_rng(14)
    W = residual_weights(rng)
    W["bn1.g"] = np.array([1, 1, 1e-3, 1, 1, 1e-3, 1, 1], np.float32)  # slimming: tiny gamma = unimportant
    model = residual_net(W)
    new, _, _ = prune(model, layer_ratio={"c1": 0.25}, round_to=1, importance="bn-gamma", recover="none")
    np.testing.assert_array_equal(init_array(new, "bn1.g"), np.ones(6, np.float32))
    new_r, rec_r, _ = prune(model, ratio=0.5, round_to=1, importance="random", recover="none")
    new_l, rec_l, _ = prune(model, ratio=0.5, round_to=1, importance="l1", recover="none")
    assert rec_r.stats["channels"] == rec_l.stats["channels"]
    assert not np.array_equal(init_array(new_r, "c1.w"), init_array(new_l, "c1.w"))


@pytest.mark.parametrize("opts, error", [
    ({"ratio": 1.0}, OptionsError), ({"ratio": 0.3, "target_macs": 0.5}, OptionsError), ({}, OptionsError),
    ({"target_macs": 0.0}, OptionsError), ({"ratio": 0.3, "round_to": 0}, OptionsError),
    ({"ratio": 0.3, "recover": "lstsq"}, PreconditionError),
])
def test_bad_options(opts, error):
    model = concat_net({"a": conv_w(np.random.default_rng(0), 8, 3), "b": conv_w(np.random.default_rng(1), 8, 3),
                        "c": conv_w(np.random.default_rng(2), 4, 16, 1), "c.b": np.zeros(4, np.float32)})
    with pytest.raises(error):
        prune(model, **opts)


# -- recovery -------------------------------------------------------------------------------------------------------

def chain_net(W):
    n = Net(x_shape=(4, 3, 12, 12))
    y = n.op("Relu", [n.bn("bn0", n.conv("c0", "x", W), W)], "r0")
    y = n.op("Relu", [n.bn("bn1", n.conv("c1", y, W), W)], "r1")
    y = n.op("Flatten", [n.op("GlobalAveragePool", [n.conv("c2", y, W)], "gap")], "flat", axis=1)
    n.op("Gemm", [y, n.const("fc.w", W["fc"]), n.const("fc.b", W["fc.b"])], "fc", transB=1)
    return n.model(["fc_out"])


def chain_weights(seed=15):
    rng = np.random.default_rng(seed)
    W = {"c0": conv_w(rng, 32, 3), "c1": conv_w(rng, 32, 32), "c2": conv_w(rng, 16, 32),
         "fc": (rng.standard_normal((10, 16)) / 4).astype(np.float32), "fc.b": np.zeros(10, np.float32)}
    bn_w(rng, W, "bn0", 32)
    bn_w(rng, W, "bn1", 32)
    W["bn0.b"] = rng.normal(0.5, 0.3, 32).astype(np.float32)  # positive means: dropped channels shift the output
    W["bn1.b"] = rng.normal(0.5, 0.3, 32).astype(np.float32)
    return W


def test_bias_and_lstsq_recovery_reduce_the_output_error():
    model = chain_net(chain_weights())
    rng = np.random.default_rng(16)
    calib = [{"x": rng.standard_normal((4, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    test = {"x": rng.standard_normal((4, 3, 12, 12)).astype(np.float32)}
    ref = run(model, test)["fc_out"]
    err = {}
    for recover in ("none", "bias", "lstsq"):
        ctx = PassContext(calibration=calib)
        new, rec, _ = prune(model, ctx, ratio=0.5, recover=recover)
        err[recover] = output_metrics("y", ref, run(new, test)["fc_out"]).rel_l2
        if recover == "lstsq":
            assert rec.stats["recover_refit_layers"] == 3 and rec.stats["recover_samples"] == 32
        if recover == "bias":
            assert rec.stats["bias_folded_channels"] == 32  # 16 of c0's and 16 of c1's channels
    assert err["bias"] < 0.8 * err["none"]
    assert err["lstsq"] < 0.5 * err["none"] and err["lstsq"] < err["bias"]


def test_lstsq_uses_at_most_calib_samples():
    model = chain_net(chain_weights())
    rng = np.random.default_rng(17)
    calib = [{"x": rng.standard_normal((4, 3, 12, 12)).astype(np.float32)} for _ in range(8)]
    _, rec, _ = prune(model, PassContext(calibration=calib), ratio=0.5, recover="lstsq", calib_samples=10)
    assert rec.stats["recover_samples"] == 8  # whole batches of 4 (the model's batch dim is static)


# -- zoo models -----------------------------------------------------------------------------------------------------

ZOO_SIZES = {"resnet18": 32, "resnet50": 32, "mobilenetv2": 32, "yolo": 64, "unet": 64}


def zoo_model(name, hw=None):
    from models.zoo import ZOO

    hw = hw or ZOO_SIZES[name]
    return ZOO[name](1, hw, hw)


def light_shapes(model):
    """Inferred shapes, on a copy without the large weights (fast; the dims are the same)."""
    from onnxopt.skeleton import Skeleton

    return value_shapes(Skeleton(model).infer(strict=True))


def conv_gemm_macs(model):
    """Conv/ConvTranspose/Gemm MACs computed here from weight shapes and inferred output shapes."""
    shapes = light_shapes(model)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            w, out = inits[n.input[1]], shapes[n.output[0]]
            total += math.prod(out) * math.prod(w[1:])
        elif n.op_type == "ConvTranspose":
            w, x = inits[n.input[1]], shapes[n.input[0]]
            total += math.prod(x) * math.prod(w[1:])  # N*IH*IW*IC * (OC/groups)*KH*KW
        elif n.op_type == "Gemm":
            w = inits[n.input[1]]
            total += shapes[n.input[0]][0] * w[0] * w[1]
    return total


def predicted_from_counts(model, rows):
    """MACs predicted from the kept channel counts the pass reports and the ORIGINAL model's shapes."""
    shapes = light_shapes(model)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    by_name = {r["node"]: r for r in rows}
    total = 0
    for n in model.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        r = by_name[n.name]
        w = inits[n.input[1]]
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv":
            out = shapes[n.output[0]]
            spatial = math.prod(out[2:]) * out[0]
            k = math.prod(w[2:])
            g = r["in_after"] if r["depthwise"] else group
            total += spatial * r["out_after"] * k * (r["in_after"] // g)
        elif n.op_type == "ConvTranspose":
            x = shapes[n.input[0]]
            total += x[0] * math.prod(x[2:]) * r["in_after"] * math.prod(w[2:]) * (r["out_after"] // group)
        else:
            total += shapes[n.input[0]][0] * r["out_after"] * r["in_after"]
    return total


@pytest.mark.parametrize("name", list(ZOO_SIZES))
def test_zoo_ratio_0_3(name):
    model = zoo_model(name)
    new, rec, art = prune(model, ratio=0.3)
    assert rec.changed
    check_model(new)
    infer_shapes(new, strict=True)
    io = lambda m: [(v.name, v.type.tensor_type) for v in list(m.graph.input) + list(m.graph.output)]  # noqa: E731
    assert io(new) == io(model)
    feeds = feeds_for(model)
    out_old, out_new = run(model, feeds), run(new, feeds)
    for k in out_old:
        assert out_new[k].shape == out_old[k].shape and np.isfinite(out_new[k]).all()
    predicted = predicted_from_counts(model, art["layers"])
    assert rec.stats["macs_after"] == predicted == conv_gemm_macs(new) == rec.stats["layer_macs_after"]
    assert rec.stats["macs_before"] == conv_gemm_macs(model)
    assert 0.3 < rec.stats["macs_after"] / rec.stats["macs_before"] < 0.7
    assert rec.stats["params_after"] < rec.stats["params_before"]
    assert all(r["out_after"] % 8 == 0 or r["out_after"] == r["out_before"] for r in art["layers"])


def test_resnet50_target_macs_half():
    model = zoo_model("resnet50", 64)
    new, rec, art = prune(model, target_macs=0.5, recover="none")
    frac = rec.stats["macs_after"] / rec.stats["macs_before"]
    assert abs(frac - 0.5) <= 0.025, frac
    assert conv_gemm_macs(new) == rec.stats["macs_after"]
    assert all(g["after"] % 8 == 0 for g in art["groups"])
    assert sum(1 for g in art["groups"] if g["after"] < g["before"]) >= 30


def test_resnet50_dead_channels_removed_exactly():
    """30% of the channels of every bottleneck conv1/conv2 zeroed: all removed, output within rel L2 1e-5."""
    model = zoo_model("resnet50", 32)
    inits = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(18)
    zeroed = 0
    for n in model.graph.node:
        if n.op_type != "Conv" or not n.name.startswith("layer") or n.name.split(".")[-1] not in ("conv1", "conv2"):
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).copy()
        idx = rng.choice(w.shape[0], int(round(0.3 * w.shape[0])), replace=False)
        w[idx] = 0
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(w, n.input[1]))
        zeroed += len(idx)
        if n.name.endswith("conv1"):
            # conv1 feeds a zero-padded 3x3 conv: only a zero constant folds exactly there, so zero the BN as well
            # (what network slimming leaves); conv2's constants are nonzero and fold into conv3's bias.
            bn = n.name[: -len("conv1")] + "bn1"
            for p in ("weight", "bias"):
                t = inits[f"{bn}.{p}"]
                a = numpy_helper.to_array(t).copy()
                a[idx] = 0
                t.CopyFrom(numpy_helper.from_array(a, t.name))
    feeds = feeds_for(model)
    new, rec, _ = prune(model, mode="dead")
    assert rec.kind == "exact"
    assert rec.stats["dead_removed"] == zeroed
    assert rec.stats["channels_before"] - rec.stats["channels_after"] == zeroed
    assert rec.stats["folded_channels"] > 0
    m = output_metrics("logits", run(model, feeds)["logits"], run(new, feeds)["logits"])
    assert m.rel_l2 <= 1e-5, m


def test_pass_output_is_validated_by_optimize():
    import onnxopt

    model = zoo_model("resnet18")
    result = onnxopt.optimize(model, [create_pass("prune-channels", ratio=0.3)])
    assert result.ok and result.record.kind == "lossy"
    assert result.record.validation["outputs"][0]["cosine"] > 0.5
