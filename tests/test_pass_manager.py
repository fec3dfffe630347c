"""The pass manager enforces the pass contract, checks invariants, names failing passes, records the run."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import onnxopt
from onnxopt import NoOptions, Pass, PassContext, PassError, PassManager, PassResult, ValidationError
from onnxopt.pass_manager import Verifier
from onnxopt.validate import random_inputs, run
from tests.helpers import relu_model


class Noop(Pass):
    """Touches nothing."""

    name = "noop"

    def run(self, graph, ctx):
        return PassResult(False, {"skipped_nothing_to_do": 1})


class Liar(Pass):
    """Changes the graph but reports no change."""

    name = "liar"

    def run(self, graph, ctx):
        graph.nodes[0].op = "Sigmoid"
        return PassResult(False)


class Boaster(Pass):
    """Reports a change it did not make."""

    name = "boaster"

    def run(self, graph, ctx):
        return PassResult(True)


class MeddlingAnalysis(Pass):
    """An analysis pass that edits the graph."""

    name = "meddling-analysis"
    kind = "analysis"

    def run(self, graph, ctx):
        graph.nodes[0].name = "renamed"
        return PassResult(True)


class Negate(Pass):
    """Relu -> Neg: valid ONNX, wrong numerics (a broken rewrite)."""

    name = "negate"

    def run(self, graph, ctx):
        graph.nodes[0].op = "Neg"
        return PassResult(True, {"rewritten": 1})


class Dangling(Pass):
    """Points the node at a tensor nobody produces: the checker/topological check must catch it."""

    name = "dangling"

    def run(self, graph, ctx):
        graph.nodes[0].inputs[0] = gs.Variable("ghost", dtype=np.float32, shape=[2, 3])
        return PassResult(True)


class Crashes(Pass):
    """Raises inside run()."""

    name = "crashes"

    def run(self, graph, ctx):
        raise KeyError("boom")


class ToSigmoid(Pass):
    """Relu -> Sigmoid, honestly reported."""

    name = "to-sigmoid"
    Options = NoOptions

    def run(self, graph, ctx):
        graph.nodes[0].op = "Sigmoid"
        return PassResult(True, {"rewritten": 1})


def test_exact_changed_flag_is_enforced():
    with pytest.raises(PassError, match="pass 'liar' \\(#2\\) failed after noop: reported changed=False but the graph differs"):
        PassManager([Noop(), Liar()]).run(relu_model())
    with pytest.raises(PassError, match="reported changed=True but the graph is unchanged"):
        PassManager([Boaster()]).run(relu_model())


def test_analysis_pass_may_not_change_graph():
    with pytest.raises(PassError, match="analysis pass changed the graph"):
        PassManager([MeddlingAnalysis()]).run(relu_model())


def test_invariant_failure_names_pass_and_predecessors():
    with pytest.raises(PassError, match="pass 'dangling' \\(#3\\) failed after noop, to-sigmoid: .*ghost"):
        PassManager([Noop(), ToSigmoid(), Dangling()]).run(relu_model())


def test_crash_is_wrapped_with_chain():
    with pytest.raises(PassError, match="pass 'crashes' \\(#1\\) failed: KeyError") as e:
        PassManager([Crashes()]).run(relu_model())
    assert isinstance(e.value.__cause__, KeyError)


def test_verify_each_names_first_broken_pass():
    m = relu_model()
    feeds = random_inputs(m, seed=0)
    ref = run(m, feeds)
    with pytest.raises(ValidationError, match="pass 'negate' \\(#2\\) failed after noop: numerics broken"):
        PassManager([Noop(), Negate(), ToSigmoid()], verifier=Verifier(feeds, ref)).run(m)


def test_record_and_untouched_graph():
    m = relu_model()
    new, rec = PassManager([Noop()]).run(m)
    assert [p.name for p in rec.passes] == ["noop"] and not rec.passes[0].changed
    assert rec.passes[0].stats == {"skipped_nothing_to_do": 1}
    assert new.SerializeToString() == m.SerializeToString()  # unchanged: the very same model
    new, rec = PassManager([ToSigmoid()]).run(m)
    assert [n.op_type for n in new.graph.node] == ["Sigmoid"]
    p = rec.passes[0]
    assert p.changed and p.seconds >= 0 and p.before["nodes"] == p.after["nodes"] == 1 and p.kind == "exact"


def test_optimize_validation_fails_broken_pipeline_and_reports():
    result = onnxopt.optimize(relu_model(), [Negate()])
    assert not result.ok
    [out] = result.record.validation["outputs"]
    assert out["name"] == "y" and not out["ok"] and "beyond atol" in out["reason"]


def test_context_to_model_keeps_header():
    m = relu_model()
    m.producer_name = "exporter-x"
    m.metadata_props.add(key="k", value="v")
    seen = {}

    class Peek(Pass):
        """Exports the graph through the context."""

        name = "peek"

        def run(self, graph, ctx: PassContext):
            seen["model"] = ctx.to_model(graph)
            return PassResult(False)

    PassManager([Peek()]).run(m)
    assert seen["model"].producer_name == "exporter-x" and seen["model"].metadata_props[0].value == "v"
    assert seen["model"].ir_version == m.ir_version


# -- initializers that are also graph inputs (overridable defaults) ---------------------------------------------------

def overridable_model():
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"]), helper.make_node("Mul", ["b", "b"], ["bb"]),
         helper.make_node("Add", ["y", "bb"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.ones(3, np.float32), "b")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_overridable_initializers_are_never_folded():
    m = overridable_model()
    result = onnxopt.optimize(m, [onnxopt.create_pass("cleanup")])
    out = result.model
    assert [i.name for i in out.graph.input] == ["x", "b"] and [t.name for t in out.graph.initializer] == ["b"]
    assert [n.op_type for n in out.graph.node] == ["Add", "Mul", "Add"]
    assert not result.record.passes[0].changed
    assert "1 initializer(s) are also graph inputs" in result.record.notes[0]
    x, b = np.zeros(3, np.float32), np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(run(out, {"x": x, "b": b})["z"], run(m, {"x": x, "b": b})["z"])  # override honoured
    np.testing.assert_array_equal(run(out, {"x": x})["z"], np.full(3, 2, np.float32))  # default kept


def test_overridable_inputs_survive_a_changing_pass():
    m = overridable_model()
    new, rec = PassManager([ToSigmoidFirst()]).run(m, PassContext())
    assert rec.passes[0].changed
    assert [i.name for i in new.graph.input] == ["x", "b"] and [t.name for t in new.graph.initializer] == ["b"]
    x = np.zeros(3, np.float32)
    np.testing.assert_allclose(run(new, {"x": x})["z"], 1 / (1 + np.exp(-1.0)) + 1, rtol=1e-6)


def test_freeze_initializer_inputs_folds_and_drops_the_input():
    m = overridable_model()
    result = onnxopt.optimize(m, [onnxopt.create_pass("cleanup")], ctx=PassContext(freeze_initializer_inputs=True))
    out = result.model
    assert [i.name for i in out.graph.input] == ["x"] and [n.op_type for n in out.graph.node] == ["Add", "Add"]
    assert result.ok and "treated as constants" in result.record.notes[0]


class ToSigmoidFirst(Pass):
    """Applies Sigmoid to the first node's output: y = sigmoid(x + b)."""

    name = "to-sigmoid-first"

    def run(self, graph, ctx):
        node = graph.nodes[0]
        mid = gs.Variable("y_pre", dtype=np.float32, shape=[3])
        sig = gs.Node("Sigmoid", inputs=[mid], outputs=[node.outputs[0]])
        node.outputs = [mid]
        graph.nodes.insert(1, sig)
        return PassResult(True, {"inserted": 1})


def test_unused_initializers_are_dropped_and_reported():
    from onnx import numpy_helper

    m = relu_model()
    m.graph.initializer.append(numpy_helper.from_array(np.ones((4, 4), np.float32), "unused"))
    new, rec = PassManager([Noop()]).run(m)
    assert [t.name for t in new.graph.initializer] == [] and not rec.passes[0].changed
    assert rec.notes == ["1 unused initializer(s) dropped on import, e.g. 'unused'"]


def test_unused_overridable_input_keeps_its_place():
    m = overridable_model()
    from onnx import TensorProto, helper, numpy_helper

    m.graph.input.append(helper.make_tensor_value_info("spare", TensorProto.FLOAT, [2]))
    m.graph.initializer.append(numpy_helper.from_array(np.full(2, 7, np.float32), "spare"))
    new, rec = PassManager([ToSigmoidFirst()]).run(m)
    assert [i.name for i in new.graph.input] == ["x", "b", "spare"]
    assert sorted(t.name for t in new.graph.initializer) == ["b", "spare"]
    assert not any("dropped on import" in n for n in rec.notes)
