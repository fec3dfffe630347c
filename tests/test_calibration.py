"""Calibration readers (onnxopt.calibration) and streaming range collectors (onnxopt.collectors)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.calibration import ImagePreprocess, open_calibration
from onnxopt.collectors import (
    NUM_BINS,
    RangeCollector,
    augment,
    collect,
    expected_mse,
    kl_divergences,
    parallel_sessions,
    plan_groups,
    skeleton_weights,
    tensor_info,
    threshold_entropy,
    threshold_mse,
    threshold_percentile,
)
from onnxopt.errors import OptionsError
from onnxopt.model import SKELETON_STUB_BYTES, graph_skeleton, model_to_graph
from onnxopt.validate import run


def _model(inputs: dict[str, list], opset: int = 17) -> onnx.ModelProto:
    """Identity-like model: every input goes through Relu to an output."""
    nodes, ins, outs = [], [], []
    for name, shape in inputs.items():
        ins.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        outs.append(helper.make_tensor_value_info(name + "_out", TensorProto.FLOAT, shape))
        nodes.append(helper.make_node("Relu", [name], [name + "_out"], name="relu_" + name))
    m = helper.make_model(helper.make_graph(nodes, "m", ins, outs), opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _stack(source, batch_size=None) -> dict[str, np.ndarray]:
    batches = list(source.batches(batch_size) if batch_size else source)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# -- npz / npy ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_batches_in_order(tmp_path, compressed):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((150, 3, 4)).astype(np.float32)
    p = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(p, x=x)
    src = open_calibration(p, model=_model({"x": ["N", 3, 4]}), batch_size=16)
    sizes = [b["x"].shape[0] for b in src]
    assert sizes == [16] * 9 + [6]
    assert len(src) == 150 and not src.is_random
    np.testing.assert_array_equal(_stack(src)["x"], x)
    # a second pass reads the same data again
    np.testing.assert_array_equal(_stack(src, 64)["x"], x)


def test_npz_key_rules(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 2)).astype(np.float32), rng.standard_normal((5, 2)).astype(np.float32)
    # 1. the exact input name wins over calib_<name>
    np.savez(tmp_path / "both.npz", x=a, calib_x=b)
    np.testing.assert_array_equal(_stack(open_calibration(tmp_path / "both.npz", model=_model({"x": ["N", 2]})))["x"], a)
    # 2. calib_<name>
    np.savez(tmp_path / "pref.npz", calib_x=b, other=a)
    np.testing.assert_array_equal(_stack(open_calibration(tmp_path / "pref.npz", model=_model({"x": ["N", 2]})))["x"], b)
    # 3. single-input model: calib_input, or the only array
    np.savez(tmp_path / "ci.npz", calib_input=a, calib_labels=np.arange(5), test_input=b, test_labels=np.arange(5))
    src = open_calibration(tmp_path / "ci.npz", model=_model({"img": ["N", 2]}))
    np.testing.assert_array_equal(_stack(src)["img"], a)
    np.testing.assert_array_equal(src.labels(), np.arange(5))
    feeds, labels = src.eval_split()
    np.testing.assert_array_equal(feeds["img"], b)
    np.testing.assert_array_equal(labels, np.arange(5))
    np.savez(tmp_path / "one.npz", whatever=b)
    np.testing.assert_array_equal(_stack(open_calibration(tmp_path / "one.npz", model=_model({"img": ["N", 2]})))["img"], b)
    # two inputs and no matching key: the error lists the file's arrays
    with pytest.raises(OptionsError, match=r"no array for input 'y'.*has x, calib_x"):
        open_calibration(tmp_path / "both.npz", model=_model({"x": ["N", 2], "y": ["N", 2]}))


def test_samples_limit_and_static_batch(tmp_path):
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    np.savez(tmp_path / "d.npz", x=x)
    src = open_calibration(tmp_path / "d.npz", model=_model({"x": ["N", 3]}), samples=7, batch_size=3)
    assert len(src) == 7 and [b["x"].shape[0] for b in src] == [3, 3, 1]
    # a static batch dim of 4 wins over batch_size; the remainder (10 % 4) is dropped and not counted
    src = open_calibration(tmp_path / "d.npz", model=_model({"x": [4, 3]}), batch_size=3)
    assert len(src) == 8 and [b["x"].shape for b in src] == [(4, 3), (4, 3)]
    np.testing.assert_array_equal(_stack(src)["x"], x[:8])


def test_shape_and_dtype_checks(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 5), np.float32))
    with pytest.raises(OptionsError, match=r"shape \[4, 5\].*does not fit the input \[N,3\]"):
        list(open_calibration(tmp_path / "d.npz", model=_model({"x": ["N", 3]})))
    np.savez(tmp_path / "s.npz", x=np.array(["a", "b"]))
    with pytest.raises(OptionsError, match="is <U1, the input is float32"):
        list(open_calibration(tmp_path / "s.npz", model=_model({"x": ["N"]})))
    # integers are cast to the float input
    np.savez(tmp_path / "i.npz", x=np.arange(6).reshape(2, 3))
    assert _stack(open_calibration(tmp_path / "i.npz", model=_model({"x": ["N", 3]})))["x"].dtype == np.float32


def test_npy_file_and_folders(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9, 2, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    m = _model({"inp": ["N", 2, 3]})
    np.testing.assert_array_equal(_stack(open_calibration(tmp_path / "x.npy", model=m, batch_size=4))["inp"], x)
    # a folder of one-sample .npy files (no sample axis), sorted by name
    d = tmp_path / "npys"
    d.mkdir()
    for i in range(9):
        np.save(d / f"s{i:02d}.npy", x[i])
    src = open_calibration(d, model=m, batch_size=4)
    assert len(src) == 9
    np.testing.assert_array_equal(_stack(src)["inp"], x)
    # a folder of .npz files holding several samples each
    d2 = tmp_path / "npzs"
    d2.mkdir()
    np.savez(d2 / "a.npz", inp=x[:5])
    np.savez(d2 / "b.npz", inp=x[5:])
    src = open_calibration(d2, model=m, batch_size=2)
    assert len(src) == 9 and [b["inp"].shape[0] for b in src] == [2, 2, 2, 2, 1]
    np.testing.assert_array_equal(_stack(src)["inp"], x)


def test_open_errors(tmp_path):
    m = _model({"x": ["N", 3]})
    with pytest.raises(OptionsError, match="no such file or folder"):
        open_calibration(tmp_path / "missing.npz", model=m)
    with pytest.raises(OptionsError, match="not both"):
        open_calibration(tmp_path, model=m, random=True)
    with pytest.raises(OptionsError, match=r"--calib DATA \(or --calib-random"):
        open_calibration(None, model=m)
    (tmp_path / "a.npy").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(OptionsError, match="mixes arrays"):
        open_calibration(tmp_path, model=m)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(OptionsError, match="expected an .npz"):
        open_calibration(tmp_path / "x.txt", model=m)


def test_random_source_only_when_asked():
    m = _model({"x": ["N", 3, 4]})
    src = open_calibration(None, model=m, random=True, samples=10, batch_size=4, seed=3)
    assert src.is_random and len(src) == 10
    batches = list(src)
    assert [b["x"].shape for b in batches] == [(4, 3, 4), (4, 3, 4), (2, 3, 4)]
    again = list(src)
    np.testing.assert_array_equal(batches[0]["x"], again[0]["x"])  # seeded
    assert abs(float(np.concatenate([b["x"] for b in batches]).std()) - 1.0) < 0.2


# -- images ------------------------------------------------------------------------------------------------------------

def _write_images(folder, n=3, size=(10, 12)):
    from PIL import Image

    rng = np.random.default_rng(4)
    arrays = []
    folder.mkdir(exist_ok=True)
    for i in range(n):
        a = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        Image.fromarray(a, "RGB").save(folder / f"img{i}.png")
        arrays.append(a)
    return arrays


def test_image_folder_with_query_spec(tmp_path):
    pytest.importorskip("PIL")
    arrays = _write_images(tmp_path / "imgs")
    m = _model({"x": [1, 3, 10, 12]})
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.5)
    spec = f"{tmp_path / 'imgs'}?color=bgr&scale=1/255&mean=0.4,0.5,0.6&std=0.2,0.25,0.5"
    src = open_calibration(spec, model=m)
    got = _stack(src)["x"]
    want = np.stack([((a[:, :, ::-1].astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1) for a in arrays])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_image_folder_defaults_from_model_nhwc_gray_resize(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    arrays = _write_images(tmp_path / "imgs", n=2, size=(20, 24))
    (tmp_path / "imgs" / "preprocess.json").write_text(json.dumps({"mean": 0.5}))
    src = open_calibration(tmp_path / "imgs", model=_model({"x": ["N", 10, 12, 1]}), batch_size=2)
    got = _stack(src)["x"]
    assert got.shape == (2, 10, 12, 1)  # NHWC, grayscale (1 channel), resized to the model's H x W
    want = np.stack([np.asarray(Image.fromarray(a).convert("L").resize((12, 10), Image.BILINEAR), np.float32)
                     for a in arrays])[..., None] / 255 - 0.5
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the preprocess= argument wins over the sidecar file
    got2 = _stack(open_calibration(tmp_path / "imgs", model=_model({"x": ["N", 10, 12, 1]}),
                                   preprocess={"mean": 0.0}))["x"]
    np.testing.assert_allclose(got2, want + 0.5, rtol=1e-6, atol=1e-6)


def test_image_folder_errors(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    _write_images(tmp_path / "imgs", n=1)
    with pytest.raises(OptionsError, match="color=RGB gives 3 channel"):
        open_calibration(f"{tmp_path / 'imgs'}?color=rgb", model=_model({"x": [1, 1, 10, 12]}))
    with pytest.raises(OptionsError, match="bad preprocessing value std"):
        open_calibration(f"{tmp_path / 'imgs'}?std=0", model=_model({"x": [1, 3, 10, 12]}))
    monkeypatch.setitem(sys.modules, "PIL", None)  # Pillow not installed
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(OptionsError, match=r"needs Pillow: pip install 'onnxopt\[images\]'"):
        open_calibration(tmp_path / "imgs", model=_model({"x": [1, 3, 10, 12]}))


def test_image_preprocess_parse():
    spec = ImagePreprocess.parse({"size": "224", "layout": "nhwc", "color": "gray", "scale": "1/127.5",
                                  "mean": "1", "std": [0.5]}, "t")
    assert spec == ImagePreprocess((224, 224), "NHWC", "L", 1 / 127.5, (1.0,), (0.5,))
    with pytest.raises(OptionsError, match="unknown preprocessing key"):
        ImagePreprocess.parse({"sise": "2"}, "t")


# -- module:function -------------------------------------------------------------------------------------------------

def test_callable_loader(tmp_path, monkeypatch):
    (tmp_path / "my_loader.py").write_text(
        "import numpy as np\n"
        "CALLS = []\n"
        "def load():\n"
        "    CALLS.append(1)\n"
        "    for i in range(5):\n"
        "        yield {'x': np.full((2, 3), i, dtype=np.float32)}\n"
        "def bad():\n"
        "    return 3\n"
    )
    monkeypatch.chdir(tmp_path)
    m = _model({"x": ["N", 3]})
    src = open_calibration("my_loader:load", model=m, batch_size=4)
    assert len(src) == 10
    got = _stack(src)["x"]
    np.testing.assert_array_equal(got[:, 0], np.repeat(np.arange(5), 2).astype(np.float32))
    assert [b["x"].shape[0] for b in src] == [4, 4, 2]
    assert len(sys.modules["my_loader"].CALLS) == 3  # called again at every pass (and once to count)
    with pytest.raises(OptionsError, match="returned int, not an iterable"):
        len(open_calibration("my_loader:bad", model=m))
    with pytest.raises(OptionsError, match="has no attribute 'nope'"):
        open_calibration("my_loader:nope", model=m)
    with pytest.raises(OptionsError, match="cannot import module 'no_such_mod'"):
        open_calibration("no_such_mod:f", model=m)


# -- thresholds: known answers ---------------------------------------------------------------------------------------

def _hist(values: np.ndarray, edge: float, bins: int = NUM_BINS) -> np.ndarray:
    idx = np.minimum((np.abs(values) * (bins / edge)).astype(np.int64), bins - 1)
    return np.bincount(idx, minlength=bins)


def test_minmax_is_exact():
    rng = np.random.default_rng(5)
    c = RangeCollector()
    data = [rng.standard_normal(1000).astype(np.float32) * s for s in (1, 3, 0.5, 7)]
    for d in data:
        c.update(d)
    allv = np.concatenate(data)
    assert c.min == float(allv.min()) and c.max == float(allv.max())
    assert c.threshold("minmax") == float(np.abs(allv).max())
    assert c.range("minmax", symmetric=False) == (float(allv.min()), float(allv.max()))
    relu = RangeCollector()
    relu.update(np.maximum(allv, 0))
    assert relu.range("minmax", symmetric=False) == (0.0, float(allv.max()))


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy(p):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(400_000).astype(np.float32)
    c = RangeCollector()
    for chunk in np.array_split(x, 40):
        c.update(chunk)
    want = float(np.percentile(np.abs(x), p))
    assert abs(c.threshold("percentile", percentile=p) - want) <= c.width
    # the normal distribution's own quantile, within sampling error
    from statistics import NormalDist

    assert abs(want - NormalDist().inv_cdf(0.5 + p / 200)) < 0.05 * want


def _naive_kl(hist: np.ndarray, nq: int) -> dict[int, float]:
    """TensorRT's entropy calibration written as the straightforward loop over candidate cuts."""
    h = np.asarray(hist, dtype=np.float64)
    n = int(np.nonzero(h)[0][-1]) + 1
    h = h[:n]
    out = {}
    for i in range(nq, n + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        m = i // nq
        q = np.zeros(i)
        for j in range(nq):
            lo, hi = j * m, ((j + 1) * m if j < nq - 1 else i)
            nonempty = p[lo:hi] > 0
            if nonempty.any():
                q[lo:hi][nonempty] = h[lo:hi].sum() / nonempty.sum()
        if np.any((p > 0) & (q == 0)):
            out[i] = math.inf
            continue
        pp, qq = p / p.sum(), q / q.sum()
        k = pp > 0
        out[i] = float(np.sum(pp[k] * np.log(pp[k] / qq[k])))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_matches_the_plain_loop(seed):
    rng = np.random.default_rng(seed)
    hist = _hist(rng.laplace(size=50_000), 12.0, bins=700)
    hist[300:320] = 0  # a gap
    cand, kl = kl_divergences(hist, 128)
    ref = _naive_kl(hist, 128)
    assert list(cand) == sorted(ref)
    want = np.array([ref[i] for i in cand])
    assert np.array_equal(np.isinf(kl), np.isinf(want))
    np.testing.assert_allclose(kl[np.isfinite(kl)], want[np.isfinite(want)], rtol=1e-9, atol=1e-12)


def test_entropy_known_cases():
    # Uniform values with no outlier: only the full range gives P == Q, so the threshold is the maximum.
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, 2_000_000)
    c = RangeCollector()
    c.update(x)
    assert c.threshold("entropy", entropy_guard=0) == pytest.approx(c.absmax, abs=c.width)
    # ...plus a few far outliers: KL ignores them and clips at the edge of the bulk.
    c.update(np.full(50, 10.0))
    t = c.threshold("entropy", entropy_guard=0)
    assert c.edge == pytest.approx(16.0, rel=1e-5)  # the range grew by doubling to cover 10
    assert abs(t - 1.0) <= c.width
    # A spiky histogram (values repeated by constant image regions) whose KL minimum clips 0.3% of the values:
    # the guard keeps the 99.9th percentile.
    rng = np.random.default_rng(5)
    spiky = np.concatenate([rng.exponential(1.0, 100_000), np.repeat(rng.uniform(0.2, 1.5, 8), 3000),
                            rng.uniform(2, 6, 400)])
    s = RangeCollector()
    s.update(spiky)
    plain = s.threshold("entropy", entropy_guard=0)
    guarded = s.threshold("entropy")
    assert np.mean(spiky > plain) > 0.002
    assert guarded == pytest.approx(threshold_percentile(s.hist, s.width, 99.9))
    assert np.mean(spiky > guarded) <= 0.001 + 1e-4 and guarded > plain


def test_mse_optimal_clip_of_a_laplace_sample():
    rng = np.random.default_rng(8)
    x = rng.laplace(scale=1.0, size=400_000).astype(np.float32)
    c = RangeCollector()
    for chunk in np.array_split(x, 8):
        c.update(chunk)
    t = c.threshold("mse")

    def mse(clip: float) -> float:  # brute force: quantize-dequantize the sample itself
        step = clip / 127
        return float(np.mean((x - np.clip(np.round(x / step), -127, 127) * step) ** 2))

    grid = np.linspace(5, 15, 201)
    errs = np.array([mse(g) for g in grid])
    best = grid[int(np.argmin(errs))]
    assert mse(t) <= 1.01 * errs.min()
    assert abs(t - best) / best < 0.05
    assert 8.5 < t < 11  # ~9.9 b for 8 bits (Banner et al., ACIQ) on a finite sample


def test_expected_mse_model_against_exact_error():
    rng = np.random.default_rng(9)
    x = np.abs(rng.laplace(size=200_000))
    edge = float(x.max())
    h = _hist(x, edge)
    for clip in (2.0, 5.0, 9.0):
        step = clip / 127
        exact = np.sum((x - np.minimum(np.round(x / step), 127) * step) ** 2)
        model = expected_mse(h, edge / NUM_BINS, 127, np.array([clip]))[0]
        assert model == pytest.approx(exact, rel=0.03)


def test_threshold_helpers_on_empty_histograms():
    z = np.zeros(16, np.int64)
    assert threshold_entropy(z, 1.0) == 0.0 and threshold_mse(z, 1.0) == 0.0 and threshold_percentile(z, 1.0, 99) == 0.0
    c = RangeCollector()
    c.update(np.zeros(100))
    assert all(c.threshold(m) == 0.0 for m in ("minmax", "percentile", "entropy", "mse"))


# -- streaming -------------------------------------------------------------------------------------------------------

def test_streaming_equals_batch_histogram():
    """Growing the range merges bins exactly: the streamed histogram is the one-shot histogram at the final range."""
    rng = np.random.default_rng(10)
    parts = [rng.standard_normal(20_000) * s for s in (0.1, 0.3, 1.0, 0.2, 5.0, 2.0)]
    c = RangeCollector()
    for p in parts:
        c.update(p)
    allv = np.concatenate(parts)
    one = _hist(allv, c.edge)
    # values lying exactly on a merged bin edge may differ by one bin; compare cumulative counts within one bin
    diff = np.abs(np.cumsum(c.hist) - np.cumsum(one))
    assert diff.max() <= 2
    assert c.count == allv.size
    for p_ in (50, 99, 99.99):
        assert abs(c.threshold("percentile", percentile=p_) - np.percentile(np.abs(allv), p_)) <= c.width
    batch = RangeCollector()
    batch.update(allv)
    assert batch.threshold("minmax") == c.threshold("minmax")


def test_memory_does_not_grow_with_samples():
    rng = np.random.default_rng(11)
    c = RangeCollector()
    sizes = []
    for i in range(300):
        c.update(rng.standard_normal(500) * (1 + i / 10))
        sizes.append((c.hist.shape, c.hist.nbytes, len(json.dumps(c.state()))))
    assert {s[0] for s in sizes} == {(NUM_BINS,)} and {s[1] for s in sizes} == {NUM_BINS * 8}
    assert max(s[2] for s in sizes) < 120_000  # the cached state is bounded by the bin count too
    restored = RangeCollector.from_state(json.loads(json.dumps(c.state())))
    assert np.array_equal(restored.hist, c.hist) and restored.edge == c.edge and restored.max == c.max


# -- reading tensors from ONNX Runtime ---------------------------------------------------------------------------------

def _two_conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(12)
    w1 = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((3, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _full_outputs(m: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    aug = onnx.ModelProto()
    aug.CopyFrom(m)
    del aug.graph.output[:]
    aug.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return run(aug, {"x": x})


def test_collect_reads_intermediate_tensors_exactly(tmp_path):
    m = _two_conv_model()
    x = np.random.default_rng(13).standard_normal((40, 2, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    src = open_calibration(tmp_path / "d.npz", model=m)
    names = ["x", "c1", "r1", "y"]
    cols = collect(m, names, src, subsample=0, batch_size=8)
    full = _full_outputs(m, names, x)
    for n in names:
        assert cols[n].min == pytest.approx(float(full[n].min()), rel=1e-6)
        assert cols[n].max == pytest.approx(float(full[n].max()), rel=1e-6)
        assert cols[n].count == full[n].size
        # between the order statistics around the 99th percentile, within one bin
        v = np.sort(np.abs(full[n]).ravel())
        lo, hi = v[int(np.floor((v.size - 1) * 0.99))], v[min(v.size - 1, int(np.ceil(v.size * 0.99)))]
        t = cols[n].threshold("percentile", percentile=99)
        assert lo - cols[n].width <= t <= hi + cols[n].width


def test_collect_groups_under_a_memory_budget_and_subsamples(tmp_path):
    m = _two_conv_model()
    x = np.random.default_rng(14).standard_normal((24, 2, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    src = open_calibration(tmp_path / "d.npz", model=m)
    names = ["x", "c1", "r1", "y"]
    plans = []
    one = collect(m, names, src, subsample=0, batch_size=8)
    many = collect(m, names, src, subsample=0, batch_size=8, memory_mb=2000 / (1 << 20), on_plan=plans.append)
    assert len(plans[0].groups) == 4  # 8 samples x 144 floats > 2000 bytes: one tensor per pass
    for n in names:
        assert np.array_equal(one[n].hist, many[n].hist) and one[n].max == many[n].max
    sub = collect(m, names, src, subsample=20, batch_size=8)
    for n in names:
        assert sub[n].min == one[n].min and sub[n].max == one[n].max  # min/max still over every value
        assert 20 * 24 <= sub[n].count < 2 * 20 * 24 + 24  # about `subsample` values per sample
    assert plan_groups({"a": 5, "b": 5, "c": 20}, 10) == [["a", "b"], ["c"]]


def _wide_conv_model(batch: int | str) -> onnx.ModelProto:
    """Conv -> Relu -> Conv with a second weight larger than a skeleton keeps (static or dynamic batch)."""
    rng = np.random.default_rng(15)
    w1 = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    assert w1.nbytes <= SKELETON_STUB_BYTES < w2.nbytes
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 16, 12, 12])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _same_stats(a: dict[str, RangeCollector], b: dict[str, RangeCollector]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert np.array_equal(a[n].hist, b[n].hist), n
        assert (a[n].min, a[n].max, a[n].edge, a[n].count) == (b[n].min, b[n].max, b[n].edge, b[n].count), n


@pytest.mark.parametrize("subsample", [20, 5000])
def test_collect_constant_strides_read_the_same_values_as_strides_computed_in_the_graph(tmp_path, subsample):
    m = _wide_conv_model(4)
    x = np.random.default_rng(16).standard_normal((24, 2, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    src = open_calibration(tmp_path / "d.npz", model=m)
    names = ["x", "c1", "r1", "y"]
    info = tensor_info(m)
    aug, outs, starts = augment(m, names, info, subsample, 4)
    ops = [n.op_type for n in aug.graph.node]
    assert "Size" not in ops and "Mod" not in ops  # static shapes: constant strides, starts fed per batch
    if subsample == 20:
        assert sorted(starts.values()) == [14, 57, 57, 115]  # size // (20 values x 4 samples)
    else:
        assert starts == {} and ops.count("Slice") == 0  # fewer values than the budget: every value is read
    constant = collect(m, names, src, subsample=subsample, info=info)
    in_graph = collect(m, names, src, subsample=subsample, info={})  # no shapes known: strides computed in the graph
    _same_stats(constant, in_graph)
    if subsample == 20:  # 6 batches of 4 x 8 x 12 x 12 values, every 57th from a moving start
        assert 6 * (4608 // 57) <= constant["c1"].count <= 6 * -(-4608 // 57)
    else:
        assert constant["c1"].count == 24 * 8 * 144


def test_collect_from_a_skeleton_with_its_weights_in_memory(tmp_path):
    m = _wide_conv_model("N")
    x = np.random.default_rng(17).standard_normal((20, 2, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    src = open_calibration(tmp_path / "d.npz", model=m)
    g = model_to_graph(m)
    skeleton = graph_skeleton(g)
    weights = skeleton_weights(g, skeleton)
    assert list(weights) == ["w2"] and np.array_equal(weights["w2"], numpy_helper.to_array(m.graph.initializer[1]))
    names = ["x", "c1", "r1", "y"]
    _same_stats(collect(skeleton, names, src, subsample=0, batch_size=8, weights=weights),
                collect(m, names, src, subsample=0, batch_size=8))


@pytest.mark.parametrize("batch", [4, "N"])
def test_collect_in_parallel_sessions_gives_the_same_statistics(tmp_path, monkeypatch, batch):
    import onnxopt.collectors as collectors_module

    m = _wide_conv_model(batch)
    # growing ranges from batch to batch, so that the order of the histogram updates matters
    x = np.random.default_rng(18).standard_normal((28, 2, 12, 12)).astype(np.float32)
    x *= np.repeat(np.linspace(0.5, 40.0, 7), 4)[:, None, None, None].astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    src = open_calibration(tmp_path / "d.npz", model=m)
    names = ["x", "c1", "r1", "y"]
    runs = {}
    for sessions in (1, 3):
        made = []
        monkeypatch.setattr(collectors_module, "parallel_sessions",
                            lambda n, b, mb, k=sessions: made.append(n) or ((k, 1) if k > 1 else (1, None)))
        runs[sessions] = collect(m, names, src, subsample=0, batch_size=4)
        assert made == [7]  # 7 batches of 4 samples
    expected = {n: RangeCollector() for n in names}  # every value, batch by batch, in order
    aug = onnx.ModelProto()
    aug.CopyFrom(m)
    del aug.graph.output[:]
    aug.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    for i in range(0, 28, 4):
        full = run(aug, {"x": x[i:i + 4]}, optimize=True)  # the kernels collect uses
        for n in names:
            expected[n].update(full[n])
    _same_stats(runs[1], expected)
    _same_stats(runs[3], expected)


def test_parallel_sessions_one_thread_each_and_only_as_many_as_fit(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert parallel_sessions(100, 10 << 20, 256) == (4, 2)     # 8 cores: 4 sessions of 2 threads
    assert parallel_sessions(2, 10 << 20, 256) == (2, 4)       # no more sessions than batches
    assert parallel_sessions(100, 100 << 20, 256) == (3, 2)    # 2 extra copies of 100 MB fit in 256 MB
    assert parallel_sessions(100, 300 << 20, 256) == (1, None)  # none fits: one session, ONNX Runtime's threads
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert parallel_sessions(100, 10 << 20, 256) == (1, None)
