"""The cleanup pass: folding (and its failures), Identity/Dropout, dead nodes, initializers, topological order.

Every graph runs through the PassManager, which checks the changed flag against a fingerprint of the graph and runs
the ONNX checker, shape inference and the topological-order check after a change. Numerics: ONNX Runtime with graph
optimizations off (onnxopt.validate).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from onnxopt import PassContext, PassManager, create_pass
from onnxopt.validate import random_inputs, run, session
from tests.helpers import conv_bn_relu_model

COUNTS = (
    "folded_nodes", "folded_shape_nodes", "lowered_constant_nodes", "fold_failures", "removed_identity",
    "removed_dropout", "removed_dead_nodes", "removed_unused_initializers", "merged_duplicate_initializers",
    "toposorted_graphs",
)


def vi(name, dtype=T.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, dtype, list(shape) if shape is not None else None)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def make(nodes, inputs, outputs, inits=(), opset=17, ir=8):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    onnx.checker.check_model(m)
    return m


def cleanup(model, **options):
    """Run cleanup through the manager: (new model, stats, changed, ctx)."""
    ctx = PassContext()
    new, record = PassManager([create_pass("cleanup", **options)]).run(model, ctx)
    rec = record.passes[0]
    return new, rec.stats, rec.changed, ctx


def ops(model_or_graph):
    g = model_or_graph.graph if isinstance(model_or_graph, onnx.ModelProto) else model_or_graph
    return [n.op_type for n in g.node]


def nonzero(stats, keys=COUNTS):
    return {k: stats[k] for k in keys if stats.get(k)}


def assert_same_outputs(a, b, seed=0):
    feeds = random_inputs(a, seed=seed)
    ra, rb = run(session(a), feeds), run(session(b), feeds)
    assert list(ra) == list(rb)
    for k in ra:
        assert ra[k].dtype == rb[k].dtype
        np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, atol=1e-6)


def assert_io_kept(a, b):
    assert list(a.graph.input) == list(b.graph.input)
    assert list(a.graph.output) == list(b.graph.output)


def assert_idempotent(model, **options):
    again, stats, changed, _ = cleanup(model, **options)
    assert not changed and nonzero(stats, [k for k in COUNTS if k != "fold_failures"]) == {}
    assert again is model  # the manager hands back the input model when nothing changed


rng = np.random.default_rng(0)
W = rng.standard_normal((2, 3)).astype(np.float32)


# -- constant folding ------------------------------------------------------------------------------------------------
def test_folds_constant_chain_into_one_initializer():
    # y = x + (Constant(value_float=2) * w): the Constant becomes a float32 initializer, Mul is folded.
    m = make(
        [helper.make_node("Constant", [], ["two"], value_float=2.0),
         helper.make_node("Mul", ["two", "w"], ["w2"], name="mul"),
         helper.make_node("Add", ["x", "w2"], ["y"], name="add")],
        [vi("x")], [vi("y")], [init("w", W)],
    )
    new, stats, changed, _ = cleanup(m)
    assert changed
    assert ops(new) == ["Add"]
    assert nonzero(stats) == {"folded_nodes": 1, "lowered_constant_nodes": 1, "removed_unused_initializers": 1}
    (folded,) = new.graph.initializer
    assert folded.name == "w2" and folded.data_type == T.FLOAT  # graphsurgeon alone would give value_float float64
    np.testing.assert_array_equal(numpy_helper.to_array(folded), 2 * W)
    assert_io_kept(m, new)
    assert_same_outputs(m, new)
    assert_idempotent(new)


def test_folds_string_tensors():
    # graphsurgeon exports numpy values as raw data, which string tensors cannot be: the folded value must still export.
    a = helper.make_tensor("a", T.STRING, [2], [b"Ab", b"cD"])
    b = helper.make_tensor("b", T.STRING, [2], [b"-1", b"-2"])
    m = make(
        [helper.make_node("StringConcat", ["a", "b"], ["ab"]), helper.make_node("StringConcat", ["x", "ab"], ["y"])],
        [vi("x", T.STRING, [2])], [vi("y", T.STRING, [2])], [a, b], opset=20, ir=9,
    )
    new, stats, changed, _ = cleanup(m)
    assert changed and ops(new) == ["StringConcat"]
    assert nonzero(stats) == {"folded_nodes": 1, "removed_unused_initializers": 2}
    (ab,) = new.graph.initializer
    assert ab.data_type == T.STRING and list(ab.string_data) == [b"Ab-1", b"cD-2"]
    feeds = {"x": np.array(["x", "y"], dtype=object)}
    assert list(run(session(new), feeds)["y"]) == ["xAb-1", "ycD-2"]
    assert_idempotent(new)


def test_fold_failure_is_reported_and_the_rest_still_folds():
    # ONNX Runtime has no int16 Relu kernel: that node cannot be folded; the float Add next to it can.
    m = make(
        [helper.make_node("Relu", ["ci"], ["r"], name="int16_relu"),
         helper.make_node("Cast", ["r"], ["rf"], name="cast", to=T.FLOAT),
         helper.make_node("Add", ["k1", "k2"], ["k"], name="const_add"),
         helper.make_node("Add", ["x", "rf"], ["s"], name="add1"),
         helper.make_node("Add", ["s", "k"], ["y"], name="add2")],
        [vi("x", shape=[3])], [vi("y", shape=[3])],
        [init("ci", np.array([1, -2, 3], np.int16)), init("k1", np.ones(3, np.float32)),
         init("k2", np.full(3, 2, np.float32))],
    )
    new, stats, changed, ctx = cleanup(m)
    assert changed
    assert ops(new) == ["Relu", "Cast", "Add", "Add"]  # const_add folded, the failing Relu (and its Cast) kept
    assert stats["fold_failures"] == 1
    assert stats["fold_failed"] == "int16_relu(Relu)"
    assert stats["folded_nodes"] == 1
    (failure,) = ctx.artifacts["cleanup"]["fold_failures"]
    assert failure["node"] == "int16_relu" and failure["op"] == "Relu"
    assert "NOT_IMPLEMENTED" in failure["error"]
    k = next(t for t in new.graph.initializer if t.name == "k")
    np.testing.assert_array_equal(numpy_helper.to_array(k), np.full(3, 3, np.float32))
    # A second run reports the failure again but changes nothing.
    _, stats2, changed2, _ = cleanup(new)
    assert not changed2 and stats2["fold_failures"] == 1


@pytest.mark.parametrize(
    "start,end,expected",
    [(None, None, [2, 3, 4, 5]), (1, -1, [3, 4]), (-2, None, [4, 5]), (0, 100, [2, 3, 4, 5]), (3, 1, [])],
)
def test_shape_of_a_static_tensor_is_folded_with_start_and_end(start, end, expected):
    attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    m = make(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Shape", ["r"], ["s"], **attrs),
         helper.make_node("Cast", ["s"], ["sf"], to=T.FLOAT),
         helper.make_node("ReduceSum", ["sf"], ["sf_sum"], keepdims=1),
         helper.make_node("Add", ["x", "sf_sum"], ["y"])],
        [vi("x", shape=[2, 3, 4, 5])], [vi("y", shape=[2, 3, 4, 5])],
    )
    new, stats, changed, _ = cleanup(m)
    assert changed
    assert stats["folded_shape_nodes"] == 1
    assert ops(new) == ["Add"]  # Relu fed only the Shape; Shape, Cast and ReduceSum are folded
    (total,) = new.graph.initializer
    np.testing.assert_allclose(numpy_helper.to_array(total), np.sum(expected, dtype=np.float32).reshape(1))
    assert_same_outputs(m, new)


def test_shape_of_a_dynamic_tensor_is_not_folded():
    m = make(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
        [vi("x", shape=["N", 3])], [vi("y", shape=["N", 3])],
    )
    new, stats, changed, _ = cleanup(m)
    assert not changed and new is m
    assert nonzero(stats) == {}


def test_size_is_folded():
    m = make(
        [helper.make_node("Size", ["x"], ["n"]), helper.make_node("Cast", ["n"], ["nf"], to=T.FLOAT),
         helper.make_node("Mul", ["x", "nf"], ["y"])],
        [vi("x")], [vi("y")],
    )
    new, stats, changed, _ = cleanup(m)
    assert changed and ops(new) == ["Mul"] and stats["folded_shape_nodes"] == 1
    assert numpy_helper.to_array(new.graph.initializer[0]) == np.float32(6)
    assert_same_outputs(m, new)


def _expand_model(n):
    """y = x + Expand(1.0, [n]) (a folded Expand would be an n-float initializer)."""
    return make(
        [helper.make_node("Expand", ["one", "shape"], ["big"], name="expand"),
         helper.make_node("Add", ["x", "big"], ["y"])],
        [vi("x", shape=[n])], [vi("y", shape=[n])],
        [init("one", np.ones(1, np.float32)), init("shape", np.array([n], np.int64))],
    )


@pytest.mark.parametrize("threshold,folded", [(4000, False), (4096, True), (-1, True)])
def test_size_threshold(threshold, folded):
    m = _expand_model(1024)  # 4096 bytes
    new, stats, changed, _ = cleanup(m, size_threshold=threshold)
    assert changed == folded
    if folded:
        assert ops(new) == ["Add"] and stats["folded_nodes"] == 1
        assert_same_outputs(m, new)
    else:
        assert new is m and ops(new) == ["Expand", "Add"]
        assert stats["skipped_fold_size"] == 1


def test_producer_of_a_graph_output_is_not_folded():
    # The output's declared type and shape must not turn into an initializer's.
    m = make(
        [helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Relu", ["x"], ["y"])],
        [vi("x")], [vi("y"), vi("c", shape=["N", 3])],
        [init("a", W), init("b", W + 1)],
    )
    new, stats, changed, _ = cleanup(m)
    assert not changed and new is m
    assert stats["skipped_fold_graph_output"] == 1


@pytest.mark.parametrize("op", ["RandomUniformLike", "RandomNormalLike", "Bernoulli"])
def test_random_ops_are_never_folded(op):
    m = make(
        [helper.make_node(op, ["p"], ["r"], seed=1.0), helper.make_node("Add", ["x", "r"], ["y"])],
        [vi("x")], [vi("y")], [init("p", np.full((2, 3), 0.5, np.float32))],
    )
    new, stats, changed, _ = cleanup(m)
    assert not changed and new is m
    assert stats["skipped_fold_nondeterministic"] == 1


def test_dequantize_linear_of_a_constant_weight_is_kept():
    m = make(
        [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"]), helper.make_node("Add", ["x", "w"], ["y"])],
        [vi("x")], [vi("y")],
        [init("q", np.ones((2, 3), np.int8)), init("s", np.float32(0.5)), init("z", np.int8(0))],
    )
    new, stats, changed, _ = cleanup(m)
    assert not changed and stats["skipped_fold_qdq"] == 1


# -- Identity and Dropout --------------------------------------------------------------------------------------------
def test_identity_removed_and_output_names_kept():
    # x -> Identity -> Relu -> Identity -> y: both go; Relu now produces y itself.
    m = make(
        [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Relu", ["xi"], ["r"], name="relu"),
         helper.make_node("Identity", ["r"], ["y"])],
        [vi("x")], [vi("y")],
    )
    new, stats, changed, _ = cleanup(m)
    assert changed
    assert nonzero(stats) == {"removed_identity": 2}
    (relu,) = new.graph.node
    assert relu.op_type == "Relu" and list(relu.input) == ["x"] and list(relu.output) == ["y"]
    assert_io_kept(m, new)
    assert_same_outputs(m, new)
    assert_idempotent(new)


def test_identity_output_used_twice_keeps_name():
    # Relu's output r is also read by Add: after the rewrite Relu produces y and Add reads y.
    m = make(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"]),
         helper.make_node("Add", ["r", "x"], ["z"])],
        [vi("x")], [vi("y"), vi("z")],
    )
    new, stats, changed, _ = cleanup(m)
    assert changed and ops(new) == ["Relu", "Add"] and stats["removed_identity"] == 1
    assert list(new.graph.node[1].input) == ["y", "x"]
    assert_io_kept(m, new)
    assert_same_outputs(m, new)


@pytest.mark.parametrize("source", ["graph_input", "initializer", "other_output"])
def test_identity_between_graph_io_is_kept(source):
    if source == "graph_input":
        m = make([helper.make_node("Identity", ["x"], ["y"])], [vi("x")], [vi("y")])
    elif source == "initializer":
        m = make([helper.make_node("Identity", ["w"], ["y"]), helper.make_node("Relu", ["x"], ["z"])],
                 [vi("x")], [vi("y"), vi("z")], [init("w", W)])
    else:
        m = make([helper.make_node("Relu", ["x"], ["z"]), helper.make_node("Identity", ["z"], ["y"])],
                 [vi("x")], [vi("y"), vi("z")])
    new, stats, changed, _ = cleanup(m)
    assert not changed and new is m
    assert stats["skipped_identity_graph_io"] == 1


DROPOUT_CASES = {
    # name: (opset, extra inputs, their initializers/graph inputs, expect removed, skip reason)
    "opset12_no_mode": (13, [], [], [], True, None),
    "opset10_ratio_attr": (10, [], [], [], True, None),
    "mode_false": (13, ["", "mode"], [init("mode", np.bool_(False))], [], True, None),
    "mode_true": (13, ["", "mode"], [init("mode", np.bool_(True))], [], False, "skipped_dropout_training_mode"),
    "mode_input": (13, ["", "mode"], [], [vi("mode", T.BOOL, [])], False,
                   "skipped_dropout_training_mode_not_constant"),
}


@pytest.mark.parametrize("case", sorted(DROPOUT_CASES))
def test_inference_dropout_removed(case):
    opset, extra, inits, inputs, removed, reason = DROPOUT_CASES[case]
    attrs = {"ratio": 0.3} if opset < 12 else {}
    m = make(
        [helper.make_node("Dropout", ["x", *extra], ["d"], **attrs), helper.make_node("Relu", ["d"], ["y"])],
        [vi("x"), *inputs], [vi("y")], inits, opset=opset,
    )
    new, stats, changed, _ = cleanup(m)
    assert changed == removed
    if removed:
        assert ops(new) == ["Relu"] and stats["removed_dropout"] == 1
        assert_same_outputs(m, new)
        assert_io_kept(m, new)
    else:
        assert new is m and stats[reason] == 1


def test_dropout_with_used_mask_is_kept():
    m = make(
        [helper.make_node("Dropout", ["x"], ["d", "mask"]), helper.make_node("Relu", ["d"], ["y"])],
        [vi("x")], [vi("y"), vi("mask", T.BOOL)],
    )
    new, stats, changed, _ = cleanup(m)
    assert not changed and stats["skipped_dropout_mask_used"] == 1


def test_dropout_with_unused_mask_is_removed():
    m = make(
        [helper.make_node("Dropout", ["x"], ["d", "mask"]), helper.make_node("Relu", ["d"], ["y"])],
        [vi("x")], [vi("y")],
    )
    new, stats, changed, _ = cleanup(m)
    assert changed and ops(new) == ["Relu"] and stats["removed_dropout"] == 1
    assert_same_outputs(m, new)


# -- dead nodes and initializers -------------------------------------------------------------------------------------
def _dead_branch_model():
    # z = Relu(x * w_dead) feeds nothing; y = x + w.
    return make(
        [helper.make_node("Mul", ["x", "w_dead"], ["m"], name="dead_mul"),
         helper.make_node("Relu", ["m"], ["z"], name="dead_relu"),
         helper.make_node("Add", ["x", "w"], ["y"], name="add")],
        [vi("x")], [vi("y")], [init("w", W), init("w_dead", W + 1)],
    )


def test_dead_nodes_and_their_initializers_removed():
    m = _dead_branch_model()
    new, stats, changed, _ = cleanup(m)
    assert changed and ops(new) == ["Add"]
    assert nonzero(stats) == {"removed_dead_nodes": 2, "removed_unused_initializers": 1}
    assert [t.name for t in new.graph.initializer] == ["w"]
    assert_same_outputs(m, new)
    assert_idempotent(new)


def test_dead_nodes_kept_when_disabled_even_while_folding():
    # The dead Add has constant inputs: folding must not take it away either.
    m = make(
        [helper.make_node("Add", ["a", "b"], ["dead"], name="dead_add"),
         helper.make_node("Relu", ["x"], ["y"])],
        [vi("x")], [vi("y")], [init("a", W), init("b", W + 1)],
    )
    new, stats, changed, _ = cleanup(m, remove_dead_nodes=False)
    assert not changed and new is m
    assert stats["skipped_fold_dead_node_kept"] == 1
    new, stats, changed, _ = cleanup(m)
    assert changed and ops(new) == ["Relu"] and stats["removed_dead_nodes"] == 1


def test_duplicate_initializers_merged_by_dtype_shape_and_bytes():
    same = W.copy()
    as_int = W.view(np.int32)  # same bytes and shape, other dtype: not a duplicate
    other = W + 1  # same dtype and shape, other bytes
    m = make(
        [helper.make_node("Add", ["x", "w1"], ["a"]), helper.make_node("Add", ["a", "w2"], ["b"]),
         helper.make_node("Add", ["b", "w3"], ["c"]), helper.make_node("Add", ["x", "w1"], ["d"]),
         helper.make_node("Cast", ["i"], ["i_f"], to=T.FLOAT), helper.make_node("Add", ["c", "i_f"], ["e"]),
         helper.make_node("Add", ["e", "d"], ["y"])],
        [vi("x")], [vi("y")],
        [init("w1", W), init("w2", same), init("w3", other), init("i", as_int)],
    )
    new, stats, changed, _ = cleanup(m, fold_constants=False)
    assert changed
    assert nonzero(stats) == {"merged_duplicate_initializers": 1}
    assert sorted(t.name for t in new.graph.initializer) == ["i", "w1", "w3"]
    assert list(new.graph.node[1].input) == ["a", "w1"]
    assert_same_outputs(m, new)
    assert_idempotent(new, fold_constants=False)


# -- topological order -----------------------------------------------------------------------------------------------
def test_unsorted_graph_is_sorted():
    nodes = [helper.make_node("Relu", ["a"], ["y"], name="second"), helper.make_node("Neg", ["x"], ["a"], name="first")]
    g = helper.make_graph(nodes, "g", [vi("x")], [vi("y")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    new, stats, changed, _ = cleanup(m)
    assert changed and nonzero(stats) == {"toposorted_graphs": 1}
    assert [n.name for n in new.graph.node] == ["first", "second"]
    assert_same_outputs(m, new)  # ONNX Runtime sorts the original itself


def test_sorted_graph_is_not_reordered():
    # A valid order that is not graphsurgeon's by-depth order: leave it alone.
    m = make(
        [helper.make_node("Relu", ["x"], ["a"], name="a"), helper.make_node("Neg", ["a"], ["b"], name="b"),
         helper.make_node("Abs", ["x"], ["c"], name="c"), helper.make_node("Add", ["b", "c"], ["y"], name="y")],
        [vi("x")], [vi("y")],
    )
    new, stats, changed, _ = cleanup(m)
    assert not changed and new is m and stats["toposorted_graphs"] == 0


# -- everything at once, negative cases, options ---------------------------------------------------------------------
def _messy_model():
    return make(
        [helper.make_node("Identity", ["x"], ["xi"], name="id_in"),
         helper.make_node("Constant", [], ["c"], name="const", value=init("cv", np.full((2, 3), 0.5, np.float32))),
         helper.make_node("Mul", ["c", "w"], ["cw"], name="fold_me"),
         helper.make_node("Dropout", ["xi"], ["d"], name="drop"),
         helper.make_node("Add", ["d", "cw"], ["s"], name="add"),
         helper.make_node("Add", ["s", "w"], ["t"], name="add2"),
         helper.make_node("Add", ["t", "w_copy"], ["u"], name="add3"),
         helper.make_node("Sigmoid", ["x"], ["dead"], name="dead"),
         helper.make_node("Identity", ["u"], ["y"], name="id_out")],
        [vi("x")], [vi("y")], [init("w", W), init("w_copy", W.copy())],
    )


def test_everything_at_once_then_a_second_run_changes_nothing():
    m = _messy_model()
    new, stats, changed, _ = cleanup(m)
    assert changed
    assert ops(new) == ["Add", "Add", "Add"]
    assert [t.name for t in new.graph.initializer] == ["cw", "w"]
    assert nonzero(stats) == {
        "folded_nodes": 1, "lowered_constant_nodes": 1, "removed_identity": 2, "removed_dropout": 1,
        "removed_dead_nodes": 1, "merged_duplicate_initializers": 1,
    }
    assert_io_kept(m, new)
    assert_same_outputs(m, new)
    assert_idempotent(new)


@pytest.mark.parametrize(
    "option,kept_op,stat",
    [
        ("fold_constants", "Mul", "folded_nodes"),
        ("remove_identity", "Identity", "removed_identity"),
        ("remove_dropout", "Dropout", "removed_dropout"),
        ("remove_dead_nodes", "Sigmoid", "removed_dead_nodes"),
    ],
)
def test_each_step_can_be_disabled(option, kept_op, stat):
    m = _messy_model()
    new, stats, changed, _ = cleanup(m, **{option: False})
    assert changed and stats[stat] == 0
    assert kept_op in ops(new)
    assert_same_outputs(m, new)


def test_merge_duplicates_can_be_disabled():
    m = _messy_model()
    new, stats, _, _ = cleanup(m, merge_duplicates=False)
    assert stats["merged_duplicate_initializers"] == 0
    assert sorted(t.name for t in new.graph.initializer) == ["cw", "w", "w_copy"]


def test_clean_model_is_left_alone():
    m = conv_bn_relu_model()
    new, stats, changed, ctx = cleanup(m)
    assert not changed and new is m
    assert nonzero(stats) == {} and all(stats[k] == 0 for k in COUNTS)
    assert "cleanup" not in ctx.artifacts


# -- subgraphs and old IR --------------------------------------------------------------------------------------------
def test_if_branches_are_cleaned_and_keep_their_outputs():
    then = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Relu", ["xi"], ["r"]),
         helper.make_node("Identity", ["r"], ["then_out"])],
        "then", [], [vi("then_out")],
    )
    # else: x + k * w, with k a Constant of the branch and w an initializer of the main graph: k * w is folded.
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value_float=3.0), helper.make_node("Mul", ["k", "w"], ["kw"]),
         helper.make_node("Add", ["x", "kw"], ["else_out"])],
        "else", [], [vi("else_out")],
    )
    m = make(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        [vi("x"), vi("cond", T.BOOL, [])], [vi("y")], [init("w", W)],
    )
    new, stats, changed, _ = cleanup(m)
    assert changed
    assert nonzero(stats) == {
        "removed_identity": 2, "lowered_constant_nodes": 1, "folded_nodes": 1, "removed_unused_initializers": 1,
    }
    branches = {a.name: a.g for a in new.graph.node[0].attribute}
    assert ops(branches["then_branch"]) == ["Relu"] and branches["then_branch"].output[0].name == "then_out"
    assert ops(branches["else_branch"]) == ["Add"]
    assert [t.name for t in branches["else_branch"].initializer] == ["kw"]
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(run(session(new), feeds)["y"], run(session(m), feeds)["y"], rtol=1e-6)
    assert_idempotent(new)


def test_ir3_model_keeps_initializers_as_inputs():
    # Below IR 4 every initializer must also be a graph input; the rewrite must keep it that way.
    m = make(
        [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Add", ["xi", "w"], ["y"])],
        [vi("x"), vi("w")], [vi("y")], [init("w", W)], opset=8, ir=3,
    )
    new, stats, changed, _ = cleanup(m)
    assert changed and stats["removed_identity"] == 1
    assert [i.name for i in new.graph.input] == ["x", "w"]
    onnx.checker.check_model(new)
