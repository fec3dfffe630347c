"""A real round trip of a model over 2 GB (protobuf's limit for one message): load with external data, run the pass
manager, save (external data beside the model), load again, run in ONNX Runtime. Heavy: marked slow
(`python -m pytest -m slow tests/test_large_model.py`, about a minute and ~12 GB of memory)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.validate import run, session

ROWS, COLS = 300_000, 1024  # 1.23 GB per float32 table, two tables


def table(seed: int) -> np.ndarray:
    t = np.empty((ROWS, COLS), np.float32)
    t[:] = (np.arange(COLS, dtype=np.float32) * 1e-3)[None, :]
    t += (np.arange(ROWS, dtype=np.float32) * seed)[:, None]
    return t


@pytest.mark.slow
def test_over_2gb_round_trip(tmp_path):
    w1, w2 = table(1), table(2)
    g = helper.make_graph(
        [helper.make_node("Gather", ["w1", "idx"], ["a"], name="g1"), helper.make_node("Gather", ["w2", "idx"], ["b"], name="g2"),
         helper.make_node("Add", ["a", "b"], ["s"], name="add"), helper.make_node("Identity", ["s"], ["y"], name="id")],
        "big", [helper.make_tensor_value_info("idx", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, COLS])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = tmp_path / "in" / "big.onnx"
    src.parent.mkdir()
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="big.data")
    del model, g

    loaded = onnxopt.load(src)
    result = onnxopt.optimize(loaded, [onnxopt.create_pass("cleanup")], validate=False)
    assert result.record.passes[0].stats["removed_identity"] == 1
    (tmp_path / "out").mkdir()
    out = result.save(tmp_path / "out" / "big.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert out.stat().st_size < 1 << 20 and (out.parent / "big.onnx.data").stat().st_size >= 2 * ROWS * COLS * 4

    again = onnxopt.load(out)
    assert [n.op_type for n in again.graph.node] == ["Gather", "Gather", "Add"]
    idx = np.array([0, 123_456, ROWS - 1], np.int64)
    y = run(session(out), {"idx": idx})["y"]
    np.testing.assert_array_equal(y, w1[idx] + w2[idx])
