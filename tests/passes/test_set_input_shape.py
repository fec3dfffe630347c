"""Tests of the ``set-input-shape`` pass: zoo YOLO/UNet resolution change (checker, ONNX Runtime, MACs scale with the
pixel count), size-baking constants updated or refused by name, dynamic dims, options."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxopt.analysis import analyze, summarize
from onnxopt.errors import OptionsError, PreconditionError
from onnxopt.pass_base import PassContext
from onnxopt.pass_manager import PassManager
from onnxopt.passes.set_input_shape import SetInputShape
from onnxopt.pipeline import from_specs, from_toml
from onnxopt.registry import load_registry
from onnxopt.validate import run, session
from tests.helpers import init, make_model, vi

INT64_MAX = np.iinfo(np.int64).max


def i64(*values):
    return np.array(values, dtype=np.int64)


def apply(model, shapes, ctx=None):
    return PassManager([SetInputShape(shapes=shapes)], summarize=summarize).run(model, ctx or PassContext())


def out_shapes(model):
    return {o.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in o.type.tensor_type.shape.dim]
            for o in model.graph.output}


# -- the zoo ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["yolo", "unet"])
def test_zoo_resolution_change(name):
    from models.zoo import ZOO

    model = ZOO[name](batch=1, height=320, width=320, seed=0)
    before = analyze(model)
    new, record = apply(model, {"input": "1x3x640x480"})
    rec = record.passes[0]
    assert rec.changed and rec.stats["inputs_changed"] == 1
    assert rec.stats["outputs_changed"] == len(model.graph.output)
    onnx.checker.check_model(new, full_check=True)

    # output shapes: the spatial dims scale with the input (x2 in height, x1.5 in width)
    expected = {k: [n, c, h * 2, w * 3 // 2] for k, (n, c, h, w) in out_shapes(model).items()}
    assert out_shapes(new) == expected
    x = np.random.default_rng(0).standard_normal((1, 3, 640, 480)).astype(np.float32)
    outs = run(session(new), {"input": x})
    assert {k: list(v.shape) for k, v in outs.items()} == expected
    # the same network built directly at 640x480 (same seed, same weights) gives the same outputs
    direct = run(session(ZOO[name](batch=1, height=640, width=480, seed=0)), {"input": x})
    for k in expected:
        np.testing.assert_allclose(outs[k], direct[k], rtol=1e-5, atol=1e-5)

    # MACs scale exactly as the pixel count; so do these per-pixel FLOPs and the parameters do not change
    after = analyze(new)
    conv = lambda a: sum(layer.macs for layer in a.layers if layer.op_type in ("Conv", "ConvTranspose"))  # noqa: E731
    assert conv(before) > 0 and conv(after) * 320 * 320 == conv(before) * 640 * 480
    assert after.macs * 320 * 320 == before.macs * 640 * 480
    assert after.flops * 320 * 320 == before.flops * 640 * 480
    assert after.params == before.params
    assert rec.before["macs"] == before.macs and rec.after["macs"] == after.macs


# -- constants that bake in a size ------------------------------------------------------------------------------------

def tiny(h: int, w: int, seed: int = 0) -> onnx.ModelProto:
    """x[1,4,h,w] -> Conv -> Expand[1,6,h,w] -> Resize(sizes 2h x 2w) -> Slice(rows 1..2h) -> Reshape[1,6,(2h-1)*2w]
    -> Softmax. Every constant after the Conv bakes in h or w; the weights do not depend on h, w."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Expand", ["c", "expand_shape"], ["e"], name="expand"),
        helper.make_node("Resize", ["e", "", "", "sizes"], ["up"], name="resize", mode="nearest"),
        helper.make_node("Slice", ["up", "starts", "ends", "axes"], ["s"], name="slice"),
        helper.make_node("Reshape", ["s", "shape"], ["r"], name="reshape"),
        helper.make_node("Softmax", ["r"], ["y"], name="softmax", axis=-1),
    ]
    inits = [
        init("w", rng.standard_normal((6, 4, 3, 3)).astype(np.float32)),
        init("expand_shape", i64(1, 6, h, w)), init("sizes", i64(1, 6, 2 * h, 2 * w)),
        init("starts", i64(1)), init("ends", i64(2 * h)), init("axes", i64(2)),
        init("shape", i64(1, 6, (2 * h - 1) * 2 * w)),
    ]
    return make_model(nodes, [vi("x", [1, 4, h, w])], [vi("y", None)], inits)


def test_size_baking_constants_are_updated():
    model = tiny(8, 8)
    new, record = apply(model, {"x": "1x4x12x10"})
    stats = record.passes[0].stats
    assert {k: stats[k] for k in ("reshape_updated", "resize_updated", "slice_updated", "expand_updated")} == {
        "reshape_updated": 1, "resize_updated": 1, "slice_updated": 1, "expand_updated": 1}
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    assert inits["expand_shape"].tolist() == [1, 6, 12, 10]
    assert inits["sizes"].tolist() == [1, 6, 24, 20]
    assert inits["ends"].tolist() == [INT64_MAX]  # "to the end"
    assert inits["shape"].tolist() == [1, 6, 23 * 20]
    assert out_shapes(new) == {"y": [1, 6, 460]}
    onnx.checker.check_model(new, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 4, 12, 10)).astype(np.float32)
    got = run(session(new), {"x": x})["y"]
    want = run(session(tiny(12, 10)), {"x": x})["y"]  # the same network built at 12x10
    np.testing.assert_array_equal(got, want)
    # the input model is not modified
    assert out_shapes(model) == {"y": [1, 6, 15 * 16]}


def test_minus_one_and_zero_entries_are_kept():
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["a"], name="r1"),  # [0, 0, -1]: follows by itself
             helper.make_node("Reshape", ["a", "s2"], ["y"], name="r2")]  # [2, -1]: -1 absorbs the change
    model = make_model(nodes, [vi("x", [2, 4, 8, 8])], [vi("y", None)], [init("s1", i64(0, 0, -1)),
                                                                        init("s2", i64(2, -1))])
    new, record = apply(model, {"x": "2x4x8x16"})
    assert "reshape_updated" not in record.passes[0].stats
    assert out_shapes(new) == {"y": [2, 512]}
    x = np.random.default_rng(2).standard_normal((2, 4, 8, 16)).astype(np.float32)
    np.testing.assert_array_equal(run(session(new), {"x": x})["y"], x.reshape(2, -1))


def test_shared_shape_constant_gets_a_private_copy():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y1"], name="r_changed"),
             helper.make_node("Reshape", ["x2", "s"], ["y2"], name="r_same")]
    model = make_model(nodes, [vi("x", [1, 4, 8, 8]), vi("x2", [1, 4, 8, 8])], [vi("y1", None), vi("y2", None)],
                       [init("s", i64(1, 4, 64))])
    new, record = apply(model, {"x": "1x4x16x8"})
    assert record.passes[0].stats["reshape_updated"] == 1
    assert out_shapes(new) == {"y1": [1, 4, 128], "y2": [1, 4, 64]}
    inits = {t.name: numpy_helper.to_array(t).tolist() for t in new.graph.initializer}
    assert inits["s"] == [1, 4, 64] and sorted(v for k, v in inits.items() if k != "s") == [[1, 4, 128]]
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((1, 4, 16, 8)).astype(np.float32),
             "x2": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    outs = run(session(new), feeds)
    np.testing.assert_array_equal(outs["y1"], feeds["x"].reshape(1, 4, 128))
    np.testing.assert_array_equal(outs["y2"], feeds["x2"].reshape(1, 4, 64))


def _refusal_models():
    x = [vi("x", [1, 4, 8, 8])]
    rng = np.random.default_rng(4)
    return {
        # [1,4,64] -> [1,4,4,16]: which of 4, 16 scales when H*W changes?
        "split_reshape": (make_model([helper.make_node("Reshape", ["x", "s"], ["y"], name="split_reshape")], x,
                                     [vi("y", None)], [init("s", i64(1, 4, 4, 16))]), "onto several target entries"),
        "resize_ratio": (make_model([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], name="resize_ratio")],
                                    x, [vi("y", None)], [init("sizes", i64(1, 4, 12, 12))]), "not an integer"),
        "crop": (make_model([helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"], name="crop")], x,
                            [vi("y", None)], [init("st", i64(0)), init("en", i64(4)), init("ax", i64(2))]),
                 "crops axis 2 at the fixed index 4"),
        "fixed_split": (make_model([helper.make_node("Split", ["x", "sp"], ["y1", "y2"], name="fixed_split", axis=3)],
                                   x, [vi("y1", None), vi("y2", None)], [init("sp", i64(4, 4))]),
                        "splits axis 3"),
        "pos_add": (make_model([helper.make_node("Add", ["x", "pos"], ["y"], name="pos_add")], x, [vi("y", None)],
                               [init("pos", rng.standard_normal((1, 4, 8, 8)).astype(np.float32))]), "pos_add"),
    }


@pytest.mark.parametrize("node", ["split_reshape", "resize_ratio", "crop", "fixed_split", "pos_add"])
def test_ambiguous_constants_are_refused_by_name(node):
    model, reason = _refusal_models()[node]
    before = model.SerializeToString()
    with pytest.raises(PreconditionError) as e:
        apply(model, {"x": "1x4x9x9"})
    msg = str(e.value)
    assert "set-input-shape" in msg and node in msg and reason in msg and "\n" not in msg
    assert model.SerializeToString() == before


# -- dynamic dims and no-ops ------------------------------------------------------------------------------------------

def dynamic_model():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "s"], ["y"], name="flat")]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", None)], [init("s", i64(0, 3, -1))])


def test_fix_dynamic_batch():
    new, record = apply(dynamic_model(), {"x": "2x3x8x8"})
    assert record.passes[0].changed
    assert out_shapes(new) == {"y": [2, 3, 64]}
    assert [d.dim_value for d in new.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 8, 8]
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(session(new), {"x": x})["y"], np.maximum(x, 0).reshape(2, 3, 64))


def test_question_mark_keeps_a_dim():
    new, _ = apply(dynamic_model(), {"x": "?x3x16x8"})
    assert out_shapes(new) == {"y": ["N", 3, 128]}
    x = np.random.default_rng(6).standard_normal((5, 3, 16, 8)).astype(np.float32)
    assert run(session(new), {"x": x})["y"].shape == (5, 3, 128)


def test_same_shape_is_a_no_op():
    model = tiny(8, 8)
    new, record = apply(model, {"x": "1x4x8x8"})
    rec = record.passes[0]
    assert rec.changed is False and rec.stats == {"skipped_same_shape": 1} and new is model


# -- options ----------------------------------------------------------------------------------------------------------

def test_cli_and_toml_syntax(tmp_path):
    reg = load_registry(plugins=False)
    (p,) = from_specs(["set-input-shape:shapes=input:1x3x720x1280,mask:1x1x720x1280"], reg)
    assert p.options.shapes == {"input": "1x3x720x1280", "mask": "1x1x720x1280"}
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[pass]]\nname = "set-input-shape"\nshapes = { input = "1x3x720x1280", "in:0" = "?x3x8x8" }\n')
    (p,) = from_toml(cfg, reg)
    assert p.options.shapes == {"input": "1x3x720x1280", "in:0": "?x3x8x8"}


@pytest.mark.parametrize(
    "shapes, match",
    [
        ({"nope": "1x4x8x8"}, "no graph input named 'nope'; inputs are: x"),
        ({"x": "1x4x8"}, "rank 3, the input has rank 4"),
        ({"x": "1x4xAx8"}, "bad shape"),
        ({"x": "1x4x0x8"}, "positive"),
        ({}, "needs shapes"),
    ],
)
def test_bad_options(shapes, match):
    with pytest.raises(OptionsError, match=match):
        apply(tiny(8, 8), shapes)


def test_optimize_reports_not_validated_when_inputs_change():
    from onnxopt.optimize import optimize

    result = optimize(tiny(8, 8), [SetInputShape(shapes={"x": "1x4x12x10"})], ctx=PassContext())
    assert result.validated is False and result.ok and result.record.validation is None
    assert any("changed the input shapes" in n for n in result.record.notes)
    # fixing nothing that the feeds depend on keeps validation on
    same = optimize(dynamic_model(), [SetInputShape(shapes={"x": "1x3x8x8"})], ctx=PassContext())
    assert same.validated and same.ok and same.record.validation["ok"]
