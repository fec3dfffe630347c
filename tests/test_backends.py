"""Back-ends: the shared helpers, ONNX Runtime, OpenVINO (float and QDQ int8 on the digits model), and the TensorRT
code that runs without a GPU (TensorRT itself is skipped here with the reason)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from onnxopt.backends import BACKENDS, get_backend
from onnxopt.backends.base import (
    BuildOptions, ShapeProfile, atomic_write_bytes, measure_latency, parse_profiles, parse_size, resolve_profiles,
)
from onnxopt.backends import tensorrt as trt_backend
from onnxopt.errors import ModelSaveError, OnnxoptError, OptionsError
from onnxopt.model import load
from onnxopt.validate import output_metrics, run, session
from tests.helpers import conv_bn_relu_model, relu_model
from tests.test_trt_check import invoke

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_resnet.onnx"
DIGITS_DATA = ROOT / "models" / "digits.npz"
TRT_REASON = ("TensorRT is not installed (it needs an NVIDIA GPU and NVIDIA's index: "
              "pip install --extra-index-url https://pypi.nvidia.com 'onnxopt[trt]')")


@pytest.fixture(scope="module")
def digits():
    data = np.load(DIGITS_DATA)
    return load(DIGITS), data["test_input"], data["test_labels"]


# -- shared helpers ------------------------------------------------------------------------------------------------

def test_parse_profiles():
    p = parse_profiles(["input=1x3x224x224:8x3x224x224:32x3x224x224", "mask=1x77"])
    assert p["input"] == ShapeProfile((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    assert p["mask"] == ShapeProfile.fixed((1, 77)) and p["mask"].is_fixed
    assert str(p["input"]) == "1x3x224x224:8x3x224x224:32x3x224x224" and str(p["mask"]) == "1x77"


@pytest.mark.parametrize("spec, message", [
    ("input", "expected NAME=DIMS or NAME=MIN:OPT:MAX"),
    ("input=1x3:2x3", "give one shape or three (min:opt:max), not 2"),
    ("input=4x3:2x3:8x3", "need min <= opt <= max in every dim"),
    ("input=1x3:2x3x1:8x3", "min, opt and max have different ranks"),
    ("input=1xAx3", "expected dims like 1x3x224x224"),
    ("input=0x3", "dims must be positive"),
])
def test_parse_profiles_errors(spec, message):
    with pytest.raises(OptionsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_profiles([spec])


def test_parse_profiles_duplicate_name():
    with pytest.raises(OptionsError, match="given twice for 'x'"):
        parse_profiles(["x=1x3", "x=2x3"])


def test_resolve_profiles_fills_static_inputs_and_rejects_missing_ones():
    dyn = relu_model(dynamic_batch=True)
    with pytest.raises(OptionsError, match=r"input 'x' has dynamic dims \[Nx3\] and no profile"):
        resolve_profiles(dyn, {})
    assert resolve_profiles(dyn, parse_profiles(["x=1x3:2x3:4x3"]))["x"].max == (4, 3)
    assert resolve_profiles(relu_model(), {}) == {"x": ShapeProfile.fixed((2, 3))}


@pytest.mark.parametrize("text, value", [("1048576", 1 << 20), ("2G", 2 << 30), ("512MiB", 512 << 20),
                                         ("1.5k", 1536), ("3 GB", 3 << 30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "2X", "-1", "0", "0.5"])
def test_parse_size_errors(text):
    with pytest.raises(OptionsError, match="bad size"):
        parse_size(text)


def test_atomic_write_bytes(tmp_path):
    target = tmp_path / "a.engine"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, memoryview(b"second"))
    assert target.read_bytes() == b"second"
    with pytest.raises(TypeError):  # no buffer: the old file stays, no temporary file is left
        atomic_write_bytes(target, object())
    assert target.read_bytes() == b"second" and sorted(os.listdir(tmp_path)) == ["a.engine"]
    with pytest.raises(ModelSaveError, match="refusing to overwrite the input model"):
        atomic_write_bytes(target, b"x", protect=(target,))
    with pytest.raises(ModelSaveError, match="does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "a.engine", b"x")
    with pytest.raises(ModelSaveError, match="is a folder"):
        atomic_write_bytes(tmp_path, b"x")


def test_measure_latency_counts_calls_and_orders_stats():
    calls = []
    s = measure_latency(lambda: calls.append(1), warmup=3, repeats=21)
    assert len(calls) == 24 and s.repeats == 21 and s.warmup == 3
    assert s.min_ms <= s.median_ms <= s.p90_ms <= s.max_ms
    with pytest.raises(OptionsError):
        measure_latency(lambda: None, repeats=0)


def test_registry_and_unknown_backend():
    assert sorted(BACKENDS) == ["onnxruntime", "openvino", "tensorrt"]
    with pytest.raises(OptionsError, match="unknown back-end 'trt'; available: onnxruntime, openvino, tensorrt"):
        get_backend("trt")


# -- ONNX Runtime --------------------------------------------------------------------------------------------------

def test_onnxruntime_backend_matches_reference_and_writes_the_model(tmp_path):
    m = conv_bn_relu_model(channels=8)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    be = get_backend("onnxruntime")
    art = be.build(m, BuildOptions(output=tmp_path / "m.ort.onnx"))
    out = be.runner(art).run(feeds)["y"]
    np.testing.assert_allclose(out, run(m, feeds)["y"], rtol=1e-5, atol=1e-5)
    again = be.runner(art.path).run(feeds)["y"]  # from the written file
    np.testing.assert_array_equal(again, out)
    assert be.runner(art).latency(feeds, warmup=1, repeats=3).repeats == 3


# -- TensorRT without TensorRT -------------------------------------------------------------------------------------

def test_engine_path(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    assert trt_backend.engine_path(None, model) == tmp_path / "m.engine"
    assert trt_backend.engine_path(tmp_path / "out.plan", model) == tmp_path / "out.plan"
    with pytest.raises(OptionsError, match="an engine is not an ONNX model"):
        trt_backend.engine_path(tmp_path / "out.onnx", model)
    with pytest.raises(ModelSaveError, match="is a folder"):
        trt_backend.engine_path(tmp_path, model)
    with pytest.raises(ModelSaveError, match="folder .* does not exist"):
        trt_backend.engine_path(tmp_path / "no" / "m.engine", model)
    with pytest.raises(OptionsError, match="give -o ENGINE"):
        trt_backend.engine_path(None, None)


@pytest.mark.parametrize("fp16, qdq, has_flag, plan", [
    (False, False, True, (True, False)),
    (False, True, True, (True, False)),
    (False, True, False, (True, False)),  # TensorRT 11: strongly typed, nothing else needed
    (True, False, True, (False, True)),  # TensorRT 10: weakly typed + FP16 flag
])
def test_precision_plan(fp16, qdq, has_flag, plan):
    assert trt_backend.precision_plan(fp16=fp16, has_qdq=qdq, has_fp16_flag=has_flag) == plan


@pytest.mark.parametrize("qdq, has_flag, message", [
    (True, True, "--fp16 with a QDQ model"),
    (False, False, "no FP16 builder flag \\(removed in TensorRT 11\\)"),
])
def test_precision_plan_refuses_fp16_and_says_what_to_do(qdq, has_flag, message):
    with pytest.raises(OptionsError, match=message) as e:
        trt_backend.precision_plan(fp16=True, has_qdq=qdq, has_fp16_flag=has_flag)
    assert "-p convert-precision:to=fp16" in str(e.value)


def test_parser_errors_are_all_reported():
    def err(desc, name, op, index, code):
        return SimpleNamespace(desc=lambda: desc, node_name=lambda: name, node_operator=lambda: op,
                               node=lambda: index, code=lambda: SimpleNamespace(name=code))

    errors = [trt_backend.format_parser_error(e) for e in (
        err("No importer registered for op: Unique", "uniq", "Unique", 3, "UNSUPPORTED_NODE"),
        err("Invalid\nweights", "", "", 5, "INVALID_VALUE"),
        err("Failed to parse", "", "", -1, "MODEL_DESERIALIZE_FAILED"),
    )]
    assert errors == ["node 'uniq' (Unique): No importer registered for op: Unique [UNSUPPORTED_NODE]",
                      "node #5: Invalid weights [INVALID_VALUE]",
                      "model: Failed to parse [MODEL_DESERIALIZE_FAILED]"]
    msg = trt_backend.parser_errors_message(errors)
    assert msg.startswith("TensorRT's ONNX parser reported 3 errors: (1) node 'uniq' (Unique)")
    assert "(3) model: Failed to parse" in msg


def test_timing_cache_reading(tmp_path):
    assert trt_backend.read_timing_cache(None) == b""
    assert trt_backend.read_timing_cache(tmp_path / "new.cache") == b""  # created by the first build
    (tmp_path / "t.cache").write_bytes(b"\x01\x02")
    assert trt_backend.read_timing_cache(tmp_path / "t.cache") == b"\x01\x02"
    with pytest.raises(OptionsError, match="not a file"):
        trt_backend.read_timing_cache(tmp_path)


def test_dynamic_profiles_only_for_dynamic_inputs():
    assert trt_backend.dynamic_profiles(relu_model(), {}) == {}
    dyn = relu_model(dynamic_batch=True)
    assert trt_backend.dynamic_profiles(dyn, parse_profiles(["x=1x3:4x3:8x3"])) == {
        "x": ShapeProfile((1, 3), (4, 3), (8, 3))}
    with pytest.raises(OptionsError, match="no profile"):
        trt_backend.dynamic_profiles(dyn, {})


@pytest.mark.skipif(trt_backend.available()[0], reason="TensorRT is installed")
def test_missing_tensorrt_says_how_to_install(tmp_path, capsys):
    ok, why = trt_backend.TensorRTBackend.available()
    assert not ok and "pip install --extra-index-url https://pypi.nvidia.com 'onnxopt[trt]'" in why
    with pytest.raises(OnnxoptError, match="TensorRT is not installed"):
        trt_backend.TensorRTBackend().build(relu_model())
    model = tmp_path / "m.onnx"
    onnx.save(relu_model(dynamic_batch=True), model)
    # trt-check runs first (and needs no TensorRT): the dynamic input without a profile stops the build
    code, _, err = invoke(["build", model, "--backend", "tensorrt"], capsys)
    assert code == 2 and "DYNAMIC_NO_PROFILE" in err
    code, _, err = invoke(["build", model, "--backend", "tensorrt", "--input-shape", "x=1x3:2x3:4x3",
                           "--workspace", "1G", "--timing-cache", tmp_path / "t.cache"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "onnxopt: error: back-end 'tensorrt' is not available: TensorRT is not installed; it needs an NVIDIA GPU "
        "and NVIDIA's package index: pip install --extra-index-url https://pypi.nvidia.com 'onnxopt[trt]'")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # nothing written


@pytest.mark.parametrize("argv, message", [
    (["--backend", "openvino", "--workspace", "1G"], "--workspace applies to --backend tensorrt only"),
    (["--backend", "tensorrt", "--workspace", "lots", "--input-shape", "x=1x3"], "bad size 'lots'"),
    (["--backend", "tensorrt", "-o", "m.onnx"], "an engine is not an ONNX model"),
    (["--backend", "onnxruntime", "--fp16"], "onnxruntime has no FP16 build option"),
])
def test_build_argument_errors(tmp_path, capsys, argv, message):
    model = tmp_path / "m.onnx"
    onnx.save(relu_model(), model)
    code, _, err = invoke(["build", model, *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


# -- TensorRT with TensorRT (skipped here) -------------------------------------------------------------------------

@pytest.mark.tensorrt
def test_tensorrt_engine_matches_onnxruntime(tmp_path, digits):
    pytest.importorskip("tensorrt", reason=TRT_REASON)
    m, x, _ = digits
    be = get_backend("tensorrt")
    cache = tmp_path / "timing.cache"
    opts = BuildOptions(output=tmp_path / "d.engine", profiles=parse_profiles(["input=1x1x32x32:8x1x32x32:16x1x32x32"]),
                        workspace=1 << 30, timing_cache=cache)
    art = be.build(m, opts)
    assert art.path.is_file() and cache.is_file() and art.info["strongly_typed"]
    out = be.runner(art.path).run({"input": x[:16]})["logits"]
    assert output_metrics("logits", run(m, {"input": x[:16]})["logits"], out).rel_l2 < 1e-3


# -- OpenVINO ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openvino_backend():
    pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'onnxopt[openvino]'")
    return get_backend("openvino")


def test_openvino_float_digits_matches_onnxruntime(openvino_backend, digits):
    m, x, _ = digits
    art = openvino_backend.build(m)
    assert art.info["precision_hint"] == "f32" and art.info["int8_layers"] == 0
    out = openvino_backend.runner(art).run({"input": x})["logits"]
    ref = run(session(m), {"input": x})["logits"]
    assert output_metrics("logits", ref, out).rel_l2 <= 1e-4


@pytest.fixture(scope="module")
def digits_int8(digits):
    """The digits model quantized by onnxopt's own pipeline: fold-bn, then quantize (int8 QDQ, TensorRT style)."""
    from onnxopt.calibration import open_calibration
    from onnxopt.optimize import optimize
    from onnxopt.pass_base import PassContext
    from onnxopt.pipeline import from_specs
    from onnxopt.registry import load_registry

    m = digits[0]
    ctx = PassContext(seed=0)
    ctx.calibration = open_calibration(str(DIGITS_DATA), model=m, batch_size=50)
    passes = from_specs(["fold-bn", "quantize:check=false"], load_registry())
    return optimize(m, passes, ctx=ctx, validate=False).model


def test_quantize_output_passes_trt_check(digits_int8):
    from onnxopt.trt_check import check

    assert check(digits_int8, parse_profiles(["input=1x1x32x32:8x1x32x32:64x1x32x32"])) == []


def test_openvino_int8_digits_runs_in_int8_within_half_a_point(openvino_backend, digits, digits_int8):
    m, x, labels = digits
    assert sum(n.op_type == "QuantizeLinear" for n in digits_int8.graph.node) > 0
    art = openvino_backend.build(digits_int8)
    assert art.info["int8_layers"] >= 9  # the nine convolutions (at least) run in int8 on the low-precision path
    logits = openvino_backend.runner(art).run({"input": x})["logits"]
    acc_int8 = float(np.mean(logits.argmax(1) == labels)) * 100
    acc_float = float(np.mean(run(session(m), {"input": x})["logits"].argmax(1) == labels)) * 100
    assert abs(acc_int8 - acc_float) <= 0.5, (acc_float, acc_int8)


def test_openvino_writes_ir_atomically_and_runs_it_with_a_dynamic_batch(openvino_backend, digits, tmp_path):
    m, x, _ = digits
    out = tmp_path / "d.xml"
    opts = BuildOptions(output=out, profiles=parse_profiles(["input=1x1x32x32:4x1x32x32:8x1x32x32"]),
                        protect=(DIGITS,))
    art = openvino_backend.build(m, opts)
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.xml"] and art.path == out
    runner = openvino_backend.runner(out)  # compiled again from the written IR
    for batch in (1, 3, 8):
        got = runner.run({"input": x[:batch]})["logits"]
        np.testing.assert_allclose(got, run(m, {"input": x[:batch]})["logits"], rtol=1e-4, atol=1e-4)
    with pytest.raises(OptionsError, match="must end in .xml"):
        openvino_backend.build(m, BuildOptions(output=tmp_path / "d.bin"))
    with pytest.raises(OptionsError, match="dim 1 is fixed to 1 in the model"):
        openvino_backend.build(m, BuildOptions(profiles=parse_profiles(["input=1x2x32x32"])))


def test_cli_build_and_run_with_openvino(openvino_backend, tmp_path, capsys):
    code, _, err = invoke(["build", DIGITS, "-b", "openvino", "-o", tmp_path / "d.xml",
                           "--input-shape", "input=2x1x32x32"], capsys)
    assert code == 0 and "built" in err and (tmp_path / "d.bin").is_file()
    code, _, err = invoke(["run", DIGITS, "-o", tmp_path / "d.opt.onnx", "--input-shape", "input=2x1x32x32",
                           "--backend", "openvino"], capsys)
    assert code == 0
    assert "validation (openvino vs float model in ONNX Runtime CPU)" in err
    assert "onnxruntime (float model)" in err and "latency" in err
    code, _, err = invoke(["run", DIGITS, "-o", tmp_path / "x.onnx", "--backend", "nope"], capsys)
    assert code == 2 and "unknown back-end 'nope'" in err and not (tmp_path / "x.onnx").exists()
