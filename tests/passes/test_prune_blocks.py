"""Tests of the ``prune-blocks`` pass: which residual branches are candidates, which are removed and why, numerics
against a hand-built reference without the branch, the zoo ResNet-50."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from onnxopt import create_pass
from onnxopt.errors import OptionsError
from onnxopt.model import check_model
from onnxopt.pass_base import PassContext
from onnxopt.pass_manager import PassManager
from onnxopt.validate import random_inputs, run
from tests.helpers import init, make_model, vi


def build(weights, blocks=("b1", "b2"), output_is_add=False):
    """x -> c0 -> relu -> [x + f(x), relu]* -> projection block -> 1x1 head. ``blocks`` lists the identity blocks."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def const(name, a):
        inits.append(init(name, a))
        return name

    def op(kind, ins, name, **attrs):
        nodes.append(helper.make_node(kind, ins, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def conv(name, x, stride=1, k=3):
        return op("Conv", [x, const(f"{name}.w", weights[name])], name, pads=[k // 2] * 4, strides=[stride] * 2)

    def bn(name, x):
        return op("BatchNormalization", [x] + [const(f"{name}.{p}", weights[f"{name}.{p}"]) for p in "gbmv"], name)

    y = op("Relu", [conv("c0", "x")], "r0")
    for b in ("b1", "b2"):
        if b not in blocks:
            continue
        f = op("Relu", [bn(f"{b}.bn1", conv(f"{b}.c1", y))], f"{b}.r1")
        f = bn(f"{b}.bn2", conv(f"{b}.c2", f))
        y = op("Add", [f, y], f"{b}.add")
        if not (output_is_add and b == blocks[-1]):
            y = op("Relu", [y], f"{b}.r2")
    outputs = [y]
    if not output_is_add:
        f = bn("p.bn", conv("p.c", y, stride=2))
        s = conv("p.ds", y, stride=2, k=1)
        y = op("Relu", [op("Add", [f, s], "p.add")], "p.r")
        outputs = [conv("head", y, k=1)]
    return make_model(nodes, [vi("x", [2, 3, 8, 8])], [vi(o, None) for o in outputs], inits, name="blocks")


def weights(weak="b2"):
    rng = np.random.default_rng(1)
    W = {}

    def conv(name, o, i, k=3):
        W[name] = (rng.standard_normal((o, i, k, k)) / math.sqrt(i * k * k)).astype(np.float32)

    def bn(name, c, gamma=1.0):
        W[f"{name}.g"] = (rng.uniform(0.5, 1.5, c) * gamma).astype(np.float32)
        W[f"{name}.b"] = rng.normal(0, 0.1, c).astype(np.float32)
        W[f"{name}.m"] = rng.normal(0, 0.1, c).astype(np.float32)
        W[f"{name}.v"] = rng.uniform(0.5, 1.5, c).astype(np.float32)

    conv("c0", 8, 3)
    for b in ("b1", "b2"):
        conv(f"{b}.c1", 8, 8)
        bn(f"{b}.bn1", 8)
        conv(f"{b}.c2", 8, 8)
        bn(f"{b}.bn2", 8, gamma=1e-3 if b == weak else 1.0)
        W[f"{b}.bn2.b"] = W[f"{b}.bn2.b"] * (1e-3 if b == weak else 1.0)
    conv("p.c", 16, 8)
    bn("p.bn", 16)
    conv("p.ds", 16, 8, 1)
    conv("head", 4, 16, 1)
    return W


def prune_blocks(model, ctx=None, **opts):
    ctx = ctx or PassContext()
    new, record = PassManager([create_pass("prune-blocks", **opts)]).run(model, ctx)
    return new, record.passes[0]


@pytest.mark.parametrize("weak", ["b1", "b2"])
def test_removes_the_branch_that_changes_the_output_least(weak):
    W = weights(weak)
    model = build(W)
    new, rec = prune_blocks(model, count=1)
    assert rec.changed and rec.stats["blocks_found"] == 2 and rec.stats["blocks_removed"] == 1
    assert rec.stats["skipped_not_identity_residual"] == 1  # the projection block
    assert rec.stats["removed"].startswith(f"{weak}.add ")
    assert "seeded random inputs" in rec.stats["scored_by"] and "data-free" in rec.stats["scored_by"]
    assert "lowest output change" in rec.stats["why"]
    gone = {f"{weak}.{n}" for n in ("c1", "bn1", "r1", "c2", "bn2", "add")}
    assert not gone & {n.name for n in new.graph.node}
    assert {f"{weak}.r2"} <= {n.name for n in new.graph.node}  # the join's ReLU stays (now on x)
    check_model(new)
    reference = build(W, blocks=tuple(b for b in ("b1", "b2") if b != weak))
    feeds = random_inputs(model, seed=3)
    # the reference drops the branch by construction; x + f(x) -> x is all the pass may change
    np.testing.assert_allclose(run(new, feeds)["head_out"], run(reference, feeds)["head_out"], rtol=1e-5, atol=1e-6)
    scores = dict(item.split("=") for item in rec.stats["scores"].split("; "))
    assert float(scores[f"{weak}.add"]) < 0.01 < float(scores[f"{({'b1', 'b2'} - {weak}).pop()}.add"])


def test_scores_on_calibration_data_when_given():
    model = build(weights())
    rng = np.random.default_rng(5)
    calib = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    new, rec = prune_blocks(model, PassContext(calibration=calib), count=1, samples=4)
    assert rec.stats["scored_by"] == "calibration data (4 samples)"
    assert rec.stats["removed"].startswith("b2.add ")


def test_target_macs_removes_until_reached():
    model = build(weights())
    # each identity block holds 40% of the Conv MACs: 0.65 needs one block, 0.5 both
    new, rec = prune_blocks(model, target_macs=0.65)
    assert rec.stats["blocks_removed"] == 1 and rec.stats["removed"].startswith("b2.add ")
    assert rec.stats["macs_after"] <= 0.65 * rec.stats["macs_before"]
    new, rec = prune_blocks(model, target_macs=0.5)
    assert rec.stats["blocks_removed"] == 2 and rec.stats["macs_after"] <= 0.5 * rec.stats["macs_before"]


def test_add_that_is_a_graph_output_becomes_identity():
    model = build(weights(), output_is_add=True)
    new, rec = prune_blocks(model, count=1)
    assert rec.changed
    add = next(n for n in new.graph.node if n.name == "b2.add")
    assert add.op_type == "Identity" and add.input[0] == "b1.r2_out"
    assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]


def test_no_residual_branch_leaves_the_graph_unchanged():
    model = build(weights(), blocks=())
    new, rec = prune_blocks(model, count=2)
    assert not rec.changed and rec.stats["skipped_no_residual_branch"] == 1
    assert new.graph == model.graph


def test_exclude_and_fewer_branches_than_count():
    model = build(weights())
    new, rec = prune_blocks(model, count=5, exclude=("b2.*",))
    assert rec.stats["skipped_excluded"] == 1 and rec.stats["blocks_removed"] == 1
    assert rec.stats["removed"].startswith("b1.add ") and rec.stats["fewer_branches_than_count"] == 4


@pytest.mark.parametrize("opts", [{}, {"count": 1, "target_macs": 0.5}, {"count": -1}, {"target_macs": 1.5}])
def test_bad_options(opts):
    with pytest.raises(OptionsError):
        prune_blocks(build(weights()), **opts)


def test_zoo_resnet50_count_2():
    from models.zoo import build_resnet50

    model = build_resnet50(1, 32, 32)
    new, rec = prune_blocks(model, count=2)
    assert rec.stats["blocks_found"] == 12 and rec.stats["skipped_not_identity_residual"] == 4
    assert rec.stats["blocks_removed"] == 2
    removed = [item.split(" ")[0] for item in rec.stats["removed"].split("; ")]
    ranked = [item.split("=")[0] for item in rec.stats["scores"].split("; ")]
    assert removed == ranked[:2]
    assert "next candidate: " + ranked[2] in rec.stats["why"]
    assert len(new.graph.node) == len(model.graph.node) - 2 * 9  # per branch: 3 Conv, 3 BN, 2 ReLU and the Add
    assert rec.stats["macs_after"] < rec.stats["macs_before"]
    assert rec.stats["params_after"] < rec.stats["params_before"] == 25_557_032
    check_model(new)
    out = run(new, random_inputs(model, seed=0))["logits"]
    assert out.shape == (1, 1000) and np.isfinite(out).all()
