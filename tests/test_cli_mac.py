"""Tests of ``onnxopt mac`` (table, --json, --plot, what-if --input-shape, one-line errors) and of the MAC/params
columns of ``onnxopt run``."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.cli import main

F32 = TensorProto.FLOAT


def cli(*args) -> int:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    from models.zoo import ZOO

    path = tmp_path_factory.mktemp("mac") / "mobilenetv2.onnx"
    onnx.save(ZOO["mobilenetv2"](batch=1, height=224, width=224, seed=0), path)
    return path


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    from models.zoo import ZOO

    path = tmp_path_factory.mktemp("mac") / "yolo.onnx"
    onnx.save(ZOO["yolo"](batch=1, height=320, width=320, seed=0), path)
    return path


def test_table_and_json(mobilenet, tmp_path, capsys):
    out = tmp_path / "mac.json"
    assert cli("mac", mobilenet, "--top", "5", "--by-op", "--json", out) == 0
    text = capsys.readouterr().out
    assert "3,504,872" in text and "300,774,272" in text  # params (PyTorch convention), MACs
    assert "top 5 layers by MACs" in text and "per op type" in text
    report = json.loads(out.read_text())
    assert report["totals"]["params"] == 3_504_872 and report["totals"]["macs"] == 300_774_272
    assert report["what_if_input_shapes"] is False
    model = onnx.load(mobilenet, load_external_data=False)
    assert len(report["layers"]) == len(model.graph.node)
    assert report["by_op"]["Conv"]["count"] == sum(1 for n in model.graph.node if n.op_type == "Conv")
    assert sum(layer["macs"] for layer in report["layers"]) == 300_774_272


def test_every_layer(mobilenet, capsys):
    assert cli("mac", mobilenet, "--top", "0") == 0
    text = capsys.readouterr().out
    assert "every layer" in text and "features.18.0" in text and "classifier.1" in text


def test_plot(mobilenet, tmp_path, capsys):
    png = tmp_path / "mac.png"
    assert cli("mac", mobilenet, "--plot", png) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_without_matplotlib(mobilenet, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    png, js = tmp_path / "mac.png", tmp_path / "mac.json"
    assert cli("mac", mobilenet, "--plot", png, "--json", js) == 2
    err = capsys.readouterr().err.strip()
    assert err == "onnxopt: error: --plot needs matplotlib: pip install 'onnxopt[plot]'"
    assert not png.exists() and not js.exists()


def dynamic_model(tmp_path):
    rng = np.random.default_rng(0)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F32, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", F32, ["N", 8, "H", "W"])],
                          [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "dyn.onnx"
    onnx.save(m, path)
    return path


def test_dynamic_input_needs_input_shape(tmp_path, capsys):
    path = dynamic_model(tmp_path)
    assert cli("mac", path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("onnxopt: error: dynamic input dims: x['N', 3, 'H', 'W']; give them with --input-shape")
    assert cli("mac", path, "--input-shape", "x=2x3x10x12") == 0
    assert f"{2 * 8 * 10 * 12 * 27:,}" in capsys.readouterr().out


def test_what_if_resolution(yolo, tmp_path, capsys):
    before = yolo.read_bytes()
    js320, js = tmp_path / "a.json", tmp_path / "b.json"
    assert cli("mac", yolo, "--json", js320) == 0
    assert cli("mac", yolo, "--input-shape", "input=1x3x640x480", "--json", js) == 0
    text = capsys.readouterr().out
    assert "what-if shapes (model unchanged)" in text and "input=1x3x640x480" in text
    a, b = json.loads(js320.read_text()), json.loads(js.read_text())
    assert b["what_if_input_shapes"] is True and b["input_shapes"] == {"input": [1, 3, 640, 480]}
    assert b["totals"]["macs"] * 320 * 320 == a["totals"]["macs"] * 640 * 480
    assert b["totals"]["params"] == a["totals"]["params"]
    assert yolo.read_bytes() == before  # nothing written


def test_what_if_refusal_names_the_node(tmp_path, capsys):
    rng = np.random.default_rng(1)
    node = helper.make_node("Add", ["x", "pos"], ["y"], name="pos_embed_add")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F32, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", F32, [1, 4, 8, 8])],
                          [numpy_helper.from_array(rng.standard_normal((1, 4, 8, 8)).astype(np.float32), "pos")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "pos.onnx"
    onnx.save(m, path)
    assert cli("mac", path, "--input-shape", "x=1x4x16x16") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pos_embed_add" in err and "shape inference fails" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--json", "/nonexistent-folder/x.json"], "folder /nonexistent-folder does not exist"),
        (["--input-shape", "nope=1x3x8x8"], "unknown input(s) 'nope'"),
        (["--input-shape", "input=1x3"], "rank"),
    ],
)
def test_bad_arguments(mobilenet, capsys, args, message):
    assert cli("mac", mobilenet, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_missing_file(tmp_path, capsys):
    assert cli("mac", tmp_path / "missing.onnx") == 2
    assert "no such file" in capsys.readouterr().err


def test_run_reports_macs_params_and_size_per_pass(mobilenet, tmp_path, capsys):
    out, js = tmp_path / "opt.onnx", tmp_path / "run.json"
    assert cli("run", mobilenet, "-o", out, "-p", "fold-bn", "-p", "mac", "--json", js) == 0
    err = capsys.readouterr().err
    for column in ("params", "MACs", "weights"):
        assert column in err
    record = json.loads(js.read_text())
    fold, mac = record["passes"]
    # folding 52 BNs: gamma/beta (2 per channel) become one conv bias per channel (NOTES.md)
    bn_channels = 34_112 // 2
    assert fold["before"]["params"] == 3_504_872
    assert fold["after"]["params"] == 3_504_872 - 2 * bn_channels + bn_channels
    assert fold["before"]["macs"] == fold["after"]["macs"] == 300_774_272
    assert fold["after"]["weight_bytes"] < fold["before"]["weight_bytes"]
    assert mac["stats"]["macs"] == 300_774_272 and mac["changed"] is False
    assert record["before"]["macs"] == record["after"]["macs"] == 300_774_272
