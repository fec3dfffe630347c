"""Model I/O: loading checks, external data, atomic saves, and the CLI's one-line errors (exit 2, nothing written)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import ModelLoadError, ModelSaveError, load, save
from onnxopt.cli import main
from onnxopt.validate import run
from tests.helpers import conv_bn_relu_model, relu_model


def invoke(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def external_model(tmp_path: Path, location: str = "weights.bin") -> Path:
    m = conv_bn_relu_model(channels=16)
    onnx.external_data_helper.convert_model_to_external_data(
        m, all_tensors_to_one_file=True, location=location, size_threshold=0
    )
    path = tmp_path / "ext.onnx"
    onnx.save_model(m, str(path))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# -- loading ---------------------------------------------------------------------------------------------------------

def test_load_roundtrip_external_data(tmp_path):
    path = external_model(tmp_path)
    m = load(path)
    ref = conv_bn_relu_model(channels=16)
    got = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for t in ref.graph.initializer:
        np.testing.assert_array_equal(got[t.name], numpy_helper.to_array(t))
    # saved again with external data: model file + one data file beside it, loadable, same numerics
    (tmp_path / "out").mkdir()
    out = save(m, tmp_path / "out" / "m.onnx", external_data=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx", "m.onnx.data"]
    stored = onnx.load(str(out), load_external_data=False)
    external = [t.name for t in stored.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external == ["w"]  # tensors over 1 KiB go to the data file, small ones stay inline
    again = load(out)
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(again, x)["y"], run(ref, x)["y"])


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    m = relu_model()
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous content")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("onnxopt.model._write", boom)
    with pytest.raises(ModelSaveError, match="No space left"):
        save(m, target)
    assert target.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_save_refuses_protected_input(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(relu_model(), str(path))
    before = path.read_bytes()
    with pytest.raises(ModelSaveError, match="refusing to overwrite the input"):
        save(relu_model(), path, protect=(path,))
    assert path.read_bytes() == before


@pytest.mark.parametrize("location,message", [
    ("/tmp/abs_weights.bin", "is absolute"),
    ("../escape.bin", "escapes the model's folder"),
    ("missing.bin", "not found"),
])
def test_bad_external_locations_refused(tmp_path, location, message):
    sub = tmp_path / "sub"
    sub.mkdir()
    m = conv_bn_relu_model()
    for t in m.graph.initializer:
        raw = numpy_helper.to_array(t).tobytes()
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
            e = t.external_data.add()
            e.key, e.value = k, v
    path = sub / "m.onnx"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(ModelLoadError, match=message):
        load(path)


# -- CLI errors: exit 2, one line, nothing written ----------------------------------------------------------------------

def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp_path / "nope.onnx", "no such file")
    txt = tmp_path / "text.onnx"
    txt.write_text("this is not a model\n" * 10)
    cases["not_onnx"] = (txt, "not an ONNX")
    good = conv_bn_relu_model().SerializeToString()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(good[: len(good) // 2])
    cases["truncated"] = (trunc, "truncated")
    bad = conv_bn_relu_model()
    bad.graph.node[0].input[1] = "undefined_weight"
    bad_path = tmp_path / "checker.onnx"
    bad_path.write_bytes(bad.SerializeToString())
    cases["checker"] = (bad_path, "checker failed")
    old = conv_bn_relu_model(opset=17)
    old.opset_import[0].version = 5
    old_path = tmp_path / "opset5.onnx"
    old_path.write_bytes(old.SerializeToString())
    cases["opset_low"] = (old_path, "outside the supported range")
    new = conv_bn_relu_model(opset=17)
    new.opset_import[0].version = 99
    new_path = tmp_path / "opset99.onnx"
    new_path.write_bytes(new.SerializeToString())
    cases["opset_high"] = (new_path, "outside the supported range")
    extdir = tmp_path / "ext"
    extdir.mkdir()
    ext = external_model(extdir, location="weights.bin")
    (extdir / "weights.bin").unlink()
    cases["missing_external"] = (ext, "not found")
    return cases


@pytest.mark.parametrize(
    "case", ["missing", "not_onnx", "truncated", "checker", "opset_low", "opset_high", "missing_external"]
)
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    path, message = _bad_inputs(tmp_path)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = snapshot(tmp_path)
    code, out, err = invoke(["run", path, "-o", out_dir / "o.onnx"], capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxopt: error:") and message in lines[0]
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []
    assert snapshot(tmp_path) == before


def test_cli_refuses_output_equal_to_input(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn_relu_model(), str(path))
    before = path.read_bytes()
    code, _, err = invoke(["run", path, "-o", path], capsys)
    assert code == 2 and "--in-place" in err
    assert path.read_bytes() == before


def test_cli_in_place_allowed(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn_relu_model(), str(path))
    code, _, err = invoke(["run", path, "-o", path, "--in-place", "-q"], capsys)
    assert code == 0, err
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["Conv", "Relu"]


def test_cli_debug_shows_traceback(tmp_path, capsys):
    code, _, err = invoke(["--debug", "run", tmp_path / "nope.onnx"], capsys)
    assert code == 2 and "Traceback" in err


def test_input_model_never_modified(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn_relu_model(), str(path))
    before = path.read_bytes()
    mtime = os.stat(path).st_mtime_ns
    code, _, err = invoke(["run", path, "-o", tmp_path / "o.onnx"], capsys)
    assert code == 0, err
    assert path.read_bytes() == before and os.stat(path).st_mtime_ns == mtime
    assert [n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node] == ["Conv", "Relu"]


# -- streamed serialization ------------------------------------------------------------------------------------------

def _canonical(model: onnx.ModelProto) -> tuple:
    """A model's content with initializers sorted by name (streamed saves append large initializers last)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = sorted(m.graph.initializer, key=lambda t: t.name)
    arrays = [(t.name, t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in inits]
    del m.graph.initializer[:]
    return m.SerializeToString(deterministic=True), arrays


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.int8, np.uint8, np.bool_])
def test_streamed_save_equals_exported_model(tmp_path, dtype):
    import onnx_graphsurgeon as gs

    from onnxopt.model import graph_to_model, header_of, save_graph, serialize_pieces

    rng = np.random.default_rng(0)
    big = (rng.standard_normal((40, 64)) * 10).astype(dtype)  # over the 4 KiB stub threshold for every dtype
    small = np.arange(3, dtype=np.int64)
    g = helper.make_graph(
        [helper.make_node("Identity", ["big"], ["y"], name="id"), helper.make_node("Identity", ["small"], ["z"])],
        "g", [], [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [40, 64]),
                  helper.make_tensor_value_info("z", TensorProto.INT64, [3])],
        [numpy_helper.from_array(big, "big"), numpy_helper.from_array(small, "small")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="p")
    model.ir_version = 8
    graph = gs.import_onnx(model)
    # one lazily loaded constant (from the proto) and one replaced by a numpy array, as passes do
    extra = gs.Constant("extra", (rng.standard_normal((33, 50)) * 5).astype(dtype))
    graph.nodes.append(gs.Node("Identity", inputs=[extra], outputs=[gs.Variable("w", dtype=np.dtype(dtype), shape=[33, 50])]))
    graph.outputs.append(graph.nodes[-1].outputs[0])
    header = header_of(model)
    expected = graph_to_model(graph, header)
    streamed = onnx.ModelProto()
    streamed.ParseFromString(b"".join(serialize_pieces(graph, header)))
    assert _canonical(streamed) == _canonical(expected)
    out = save_graph(graph, header, tmp_path / "s.onnx")
    assert _canonical(load(out)) == _canonical(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx"]


# -- run: validation verdicts, --force, --verify-each, --config, --json -------------------------------------------------

@pytest.fixture
def bn_model_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn_relu_model(channels=8), str(path))
    return path


def test_failed_validation_writes_nothing_exit_3(bn_model_file, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    # folding changes float32 rounding: with zero tolerance the comparison must fail
    code, _, err = invoke(["run", bn_model_file, "-o", out, "--atol", "0", "--rtol", "0"], capsys)
    assert code == 3 and "validation failed, nothing written" in err and "y:" in err
    assert not out.exists()


def test_force_writes_and_says_so(bn_model_file, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, _, err = invoke(["run", bn_model_file, "-o", out, "--atol", "0", "--rtol", "0", "--force"], capsys)
    assert code == 0 and "writing anyway because of --force" in err
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Conv", "Relu"]


def test_verify_each_names_the_pass_on_the_cli(bn_model_file, tmp_path, capsys):
    code, _, err = invoke(["run", bn_model_file, "-o", tmp_path / "o.onnx", "--verify-each", "--atol", "0",
                           "--rtol", "0"], capsys)
    assert code == 3 and "pass 'fold-bn' (#1) failed: numerics broken by this pass" in err
    assert not (tmp_path / "o.onnx").exists()


def test_config_pipeline_and_json_record(bn_model_file, tmp_path, capsys):
    import json

    cfg = tmp_path / "p.toml"
    cfg.write_text('[[pass]]\nname = "fold-bn"\nstandalone = "mul-add"\n\n[[pass]]\nname = "cleanup"\n')
    out, js = tmp_path / "o.onnx", tmp_path / "run.json"
    code, _, err = invoke(["run", bn_model_file, "-o", out, "--config", cfg, "--json", js], capsys)
    assert code == 0, err
    rec = json.loads(js.read_text())
    assert [p["name"] for p in rec["passes"]] == ["fold-bn", "cleanup"]
    assert rec["passes"][0]["options"]["standalone"] == "mul-add" and rec["passes"][0]["stats"]["folded_into_conv"] == 1
    assert rec["validation"]["ok"] and rec["written"] and rec["output"] == str(out)
    assert rec["before"]["nodes"] == 3 and rec["after"]["nodes"] == 2
    code, _, err = invoke(["run", bn_model_file, "-o", out, "--config", cfg, "-p", "cleanup"], capsys)
    assert code == 2 and "not both" in err
