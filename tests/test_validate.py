"""Validation metrics, tolerances and inputs (onnxopt.validate)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxopt import OptionsError, PreconditionError
from onnxopt.validate import Tolerances, compare_outputs, load_inputs, output_metrics, parse_per_output, random_inputs
from tests.helpers import relu_model


def test_metrics_against_hand_values():
    ref = np.array([[3.0, 4.0], [0.0, 1.0]], np.float32)
    new = np.array([[3.0, 4.5], [0.0, 0.5]], np.float32)
    m = output_metrics("y", ref, new)
    assert m.max_abs == pytest.approx(0.5) and m.max_rel == pytest.approx(0.5)
    nr, ne = math.sqrt(26), math.sqrt(0.5)
    assert m.rel_l2 == pytest.approx(ne / nr)
    assert m.sqnr_db == pytest.approx(20 * math.log10(nr / ne))
    assert m.cosine == pytest.approx((9 + 18 + 0.5) / (nr * math.sqrt(9 + 20.25 + 0.25)))
    assert m.top1_agreement == 1.0  # both rows keep their argmax (column 1)
    assert not m.exact_match and m.nonfinite_new == 0


def test_top1_agreement_counts_rows():
    ref = np.array([[0, 1], [1, 0], [0, 1], [1, 0]], np.float32)
    new = np.array([[0, 1], [0, 1], [0, 1], [1, 0]], np.float32)
    assert output_metrics("logits", ref, new).top1_agreement == 0.75
    assert output_metrics("vec", ref[0], new[0]).top1_agreement is None  # not [N, C]


def test_new_nan_fails_even_report_only():
    ref = np.ones((4,), np.float32)
    new = ref.copy()
    new[2] = np.nan
    cmp = compare_outputs({"y": ref}, {"y": new}, Tolerances.for_kind("lossy"))
    assert not cmp.ok and "1 new NaN/Inf" in cmp.outputs[0].reason


def test_per_output_tolerances():
    ref = {"a": np.zeros(3, np.float32), "b": np.zeros(3, np.float32)}
    new = {"a": np.full(3, 1e-3, np.float32), "b": np.full(3, 1e-3, np.float32)}
    tol = Tolerances(atol=1e-4, rtol=0, per_output_atol={"b": 1e-2})
    cmp = compare_outputs(ref, new, tol)
    assert [o.ok for o in cmp.outputs] == [False, True]
    assert parse_per_output(["1e-4", "logits=1e-3"], "--atol") == (1e-4, {"logits": 1e-3})
    with pytest.raises(OptionsError, match="bad --atol"):
        parse_per_output(["x=abc"], "--atol")


def test_random_inputs_batch_default_and_refusal():
    m = relu_model(shape=(2, 3), dynamic_batch=True)
    feeds = random_inputs(m, seed=3)
    assert feeds["x"].shape == (1, 3) and feeds["x"].dtype == np.float32
    np.testing.assert_array_equal(feeds["x"], random_inputs(m, seed=3)["x"])
    assert random_inputs(m, {"x": (5, 3)})["x"].shape == (5, 3)
    with pytest.raises(PreconditionError, match="dynamic input dims"):
        random_inputs(m, default_batch=None)
    with pytest.raises(OptionsError, match="dim 1 is fixed to 3"):
        random_inputs(m, {"x": (5, 4)})


def test_load_inputs_by_name_or_key(tmp_path):
    m = relu_model(shape=(2, 3), dynamic_batch=True)
    data = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.savez(tmp_path / "f.npz", x=data, other=data * 2)
    np.testing.assert_array_equal(load_inputs(tmp_path / "f.npz", m)["x"], data.astype(np.float32))
    np.testing.assert_array_equal(load_inputs(f"{tmp_path / 'f.npz'}:other", m)["x"], (data * 2).astype(np.float32))
    with pytest.raises(OptionsError, match="no array 'nope'"):
        load_inputs(f"{tmp_path / 'f.npz'}:nope", m)
    np.savez(tmp_path / "g.npz", y=data)
    with pytest.raises(OptionsError, match="missing arrays for input\\(s\\) x; has y \\(use FILE.npz:KEY"):
        load_inputs(tmp_path / "g.npz", m)


def test_run_report_counts_params_and_per_sample_macs_with_dynamic_batch():
    from onnxopt.analysis import summarize
    from tests.helpers import conv_bn_relu_model

    m = conv_bn_relu_model(channels=4)
    for vi in (m.graph.input[0], m.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    s = summarize(m)
    # conv 4x3x3x3 weights + BN gamma, beta (running stats are buffers); MACs = OC*OH*OW*KH*KW*IC for one sample
    assert s["params"] == 4 * 3 * 3 * 3 + 2 * 4 and s["buffers"] == 2 * 4
    assert s["macs"] == 4 * 8 * 8 * 3 * 3 * 3
    assert s["macs_note"] == "per sample: dynamic batch of x read as 1"


def test_progress_bar_counts_and_is_silent_when_disabled():
    from onnxopt.progress import ProgressBar

    with ProgressBar(False, 3, "x") as off:
        off.advance(1)
        assert off.bar is None
    on = ProgressBar(True, 3, "work")
    for _ in range(3):
        on.advance(1, "step")
    task = on.bar.tasks[0]
    assert (task.completed, task.total, task.description) == (3, 3, "step")
    on.close()
    assert on.bar is None
