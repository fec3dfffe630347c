"""Robustness corpus: ONNX's own operator test cases through the default pipeline (fold-bn, cleanup).

``onnx.backend.test.case.node.collect_testcases()`` builds ~1,900 small models with inputs and expected outputs. Each
case runs through what ``onnxopt run`` does: the load checks (opset range, ONNX checker), then the ``PassManager`` with
the default pipeline (which runs its own invariant checks after a change), then ONNX Runtime (graph optimizations off).

Outcomes (counted and printed in pytest's terminal summary, section "robustness corpus"):

* ``unchanged`` - the pipeline reported no change (the reason is the passes' ``skipped_*``/``fold_failures`` stats,
  or "nothing to do").
* ``changed_ok`` - changed, and ONNX Runtime reproduces the expected outputs within the case's rtol/atol. Where ONNX
  Runtime disagrees with the reference on the ORIGINAL model, the optimized model must reproduce ONNX Runtime's
  outputs for the original instead (counted in the ``ort_differs_from_reference`` note).
* ``nondeterministic`` - changed, and two fresh ONNX Runtime sessions of the original disagree (random ops): the
  outputs cannot be compared. Not a failure.
* ``ort_cannot_run`` - changed, but ONNX Runtime cannot load or run the ORIGINAL model. Not a failure.
* ``unsupported`` - refused with a user-facing error before any rewrite (opset outside the supported range, checker,
  a precondition): what ``onnxopt run`` would report in one line. Not a failure.
* failures: ``changed_wrong`` (wrong outputs, or ONNX Runtime runs the original but not the optimized model),
  ``not_idempotent`` (running the pipeline again on its own result changes it again: ``changed`` flags must settle),
  ``error`` (a PassError: a pass broke the checker/shape inference/topological order, or the changed flag was wrong),
  ``crash`` (a pass raised a non-onnxopt exception, or the worker process died), ``hang`` (over the time budget).

Every case runs in a worker process (spawned, two by default) with a per-case time budget; a case over budget is
killed and counted as a hang. The default run takes a fixed stratified subset (every op type at least once, plus every
``SUBSET_STRIDE``-th case by name); the full corpus runs in the ``slow``-marked test (``pytest -m slow
tests/test_corpus.py``).
"""

from __future__ import annotations

import multiprocessing as mp
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable

import numpy as np
import pytest

from onnxopt.pass_base import Pass, PassResult

PIPELINE = ("fold-bn", "cleanup")
CASE_BUDGET_S = 60.0  # per case; generous (a case takes milliseconds) so a slow shared machine is not a "hang"
WORKERS = 2
SUBSET_STRIDE = 8
FAILURES = ("changed_wrong", "not_idempotent", "error", "crash", "hang")
OUTCOMES = (
    "unchanged", "changed_ok", "nondeterministic", "ort_cannot_run", "unsupported", *FAILURES,
)


# -- the cases -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    model: bytes
    inputs: list[Any]
    outputs: list[Any]
    rtol: float
    atol: float
    ops: tuple[str, ...]


_CACHE: list[Case] = []


def corpus() -> list[Case]:
    """All node test cases of the installed onnx, sorted by name (generated in memory, ~10 s)."""
    if not _CACHE:
        from onnx.backend.test.case.node import collect_testcases

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the generators' own numpy overflow warnings
            cases = collect_testcases()
        for c in sorted(cases, key=lambda c: c.name):
            inputs, outputs = c.data_sets[0]
            ops = tuple(sorted({n.op_type for n in c.model.graph.node}))
            _CACHE.append(Case(c.name, c.model.SerializeToString(), list(inputs), list(outputs), c.rtol, c.atol, ops))
    return _CACHE


def stratified_subset(cases: list[Case], stride: int = SUBSET_STRIDE) -> list[Case]:
    """Every ``stride``-th case by name, plus the first case of every op type not covered yet (deterministic)."""
    chosen = {c.name for c in cases[::stride]}
    covered = {op for c in cases if c.name in chosen for op in c.ops}
    for c in cases:
        missing = set(c.ops) - covered
        if missing:
            chosen.add(c.name)
            covered |= set(c.ops)
    return [c for c in cases if c.name in chosen]


# -- one case (runs in a worker process) -----------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}"


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _mismatch(expected: Any, got: Any, rtol: float, atol: float) -> str | None:
    """None when ``got`` matches ``expected`` (tensors, sequences, optionals) like onnx's backend tests, else why."""
    if expected is None or got is None:
        return None if expected is None and got is None else "optional presence differs"
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return "sequence length differs"
        for e, g in zip(expected, got):
            why = _mismatch(e, g, rtol, atol)
            if why:
                return why
        return None
    e, g = np.asarray(expected), np.asarray(got)
    if e.shape != g.shape:
        return f"shape {g.shape} != expected {e.shape}"
    if e.dtype.kind in "OSUbiu":
        return None if np.array_equal(e, g) else "values differ"
    wide = np.complex128 if e.dtype.kind == "c" else np.float64  # also widens float16, bfloat16, float8
    try:
        ef, gf = e.astype(wide), g.astype(wide)
    except (TypeError, ValueError):
        return None if np.array_equal(e, g) else "values differ"
    with np.errstate(invalid="ignore"):
        ok = np.isclose(gf, ef, rtol=rtol, atol=atol, equal_nan=True)
    if ok.all():
        return None
    return f"{int((~ok).sum())}/{ok.size} values beyond rtol={rtol:g} atol={atol:g}"


def _outputs_mismatch(expected: dict[str, Any], got: dict[str, Any], rtol: float, atol: float) -> str | None:
    for name, e in expected.items():
        if name not in got:
            return f"output {name!r} missing"
        why = _mismatch(e, got[name], rtol, atol)
        if why:
            return f"{name}: {why}"
    return None


def _unchanged_reason(record) -> str:
    keys = sorted(
        {f"{p.name}.{k}" for p in record.passes for k, v in p.stats.items()
         if (k.startswith("skipped_") or k == "fold_failures") and v}
    )
    return ", ".join(keys) or "nothing to do"


_REGISTRY: list[Any] = []


def default_passes() -> list[Any]:
    """The default pipeline, freshly configured, from the registry (built once per process)."""
    if not _REGISTRY:
        from onnxopt.registry import load_registry

        _REGISTRY.append(load_registry())
    reg = _REGISTRY[0]
    return [reg.create(n) for n in PIPELINE if n in reg]


def classify(case: Case, make_passes: Callable[[], list[Any]] = default_passes) -> tuple[str, str, dict[str, int]]:
    """(outcome, detail, the passes' integer stats as ``pass.key``) of one case."""
    import onnx

    from onnxopt.errors import OnnxoptError, PassError
    from onnxopt.model import check_model, check_opset
    from onnxopt.pass_base import PassContext
    from onnxopt.pass_manager import PassManager

    model = onnx.ModelProto.FromString(case.model)
    try:  # what onnxopt.model.load checks
        check_opset(model)
        check_model(model)
    except Exception as e:  # noqa: BLE001 - the loader turns these into a one-line ModelLoadError
        return "unsupported", f"load: {_first_line(e)}", {}
    try:
        new, record = PassManager(make_passes()).run(model, PassContext())
    except PassError as e:
        root = _root_cause(e)
        if root is not e and not isinstance(root, OnnxoptError):
            return "crash", _first_line(e), {}
        return "error", _first_line(e), {}
    except OnnxoptError as e:
        return "unsupported", _first_line(e), {}
    except Exception as e:  # noqa: BLE001 - outside any pass: a bug in the manager/export
        return "crash", _first_line(e), {}
    stats = {f"{p.name}.{k}": v for p in record.passes for k, v in p.stats.items() if isinstance(v, int) and v}
    if not any(p.changed for p in record.passes):
        return "unchanged", _unchanged_reason(record), stats
    outcome, detail = _check_outputs(model, new, case)
    if outcome in ("changed_ok", "nondeterministic", "ort_cannot_run"):
        try:
            _, again = PassManager(make_passes()).run(new, PassContext())
        except Exception as e:  # noqa: BLE001
            return "error", f"second run on the optimized model: {_first_line(e)}", stats
        changed_again = [p.name for p in again.passes if p.changed]
        if changed_again:
            return "not_idempotent", f"a second run changed it again: {', '.join(changed_again)}", stats
    return outcome, detail, stats


def _check_outputs(model, new, case: Case) -> tuple[str, str]:
    from onnxopt.validate import run, session

    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    # numpy scalars (some generators give them) are 0-d arrays to ONNX Runtime
    feeds = {n: np.asarray(v) if isinstance(v, np.generic) else v for n, v in zip(names, case.inputs)}
    try:
        ref = run(session(model), feeds)
    except Exception as e:  # noqa: BLE001
        return "ort_cannot_run", _first_line(e)
    expected = dict(zip([o.name for o in model.graph.output], case.outputs))
    note = ""
    if _outputs_mismatch(expected, ref, case.rtol, case.atol):
        again = run(session(model), feeds)
        if _outputs_mismatch(ref, again, 0.0, 0.0):
            return "nondeterministic", "two ONNX Runtime sessions of the original disagree"
        expected, note = ref, "ort_differs_from_reference"
    try:
        got = run(session(new), feeds)
    except Exception as e:  # noqa: BLE001
        return "changed_wrong", f"ONNX Runtime runs the original but not the optimized model: {_first_line(e)}"
    why = _outputs_mismatch(expected, got, case.rtol, case.atol)
    if why:
        return "changed_wrong", why + (f" ({note})" if note else "")
    return "changed_ok", note


def _worker(conn, make_passes: Callable[[], list[Any]]) -> None:
    import onnxruntime

    from onnx_graphsurgeon.logger import G_LOGGER

    # Both log failures of folding sessions and unusual dtypes; the outcomes say what matters.
    onnxruntime.set_default_logger_severity(4)
    G_LOGGER.severity = G_LOGGER.ERROR
    while True:
        case = conn.recv()
        if case is None:
            return
        t0 = time.perf_counter()
        try:
            outcome, detail, stats = classify(case, make_passes)
        except BaseException as e:  # noqa: BLE001 - the classification itself must never take the worker down
            outcome, detail, stats = "crash", f"harness: {_first_line(e)}", {}
        conn.send((case.name, outcome, detail, time.perf_counter() - t0, stats))


# -- the pool --------------------------------------------------------------------------------------------------------
@dataclass
class _Slot:
    proc: Any = None
    conn: Any = None
    case: Case | None = None
    started: float = 0.0


@dataclass
class CorpusResult:
    results: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # name -> (outcome, detail, seconds)
    stats: Counter[str] = field(default_factory=Counter)  # the passes' stats summed over all cases
    seconds: float = 0.0
    pipeline: tuple[str, ...] = ()

    def counts(self) -> Counter[str]:
        return Counter(o for o, _, _ in self.results.values())

    def names(self, outcome: str) -> list[str]:
        return sorted(n for n, (o, _, _) in self.results.items() if o == outcome)

    def summary(self, title: str) -> list[str]:
        c = self.counts()
        lines = [
            f"{title}: {len(self.results)} cases, pipeline {' + '.join(self.pipeline)}, {self.seconds:.1f} s",
            "  " + ", ".join(f"{o} {c.get(o, 0)}" for o in OUTCOMES),
        ]
        totals = ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items()) if not k.split(".")[1].startswith("bn_"))
        lines.append(f"  pass stats summed over the cases: {totals}")
        notes = Counter(d for o, d, _ in self.results.values() if o == "changed_ok" and d)
        for d, n in notes.items():
            lines.append(f"  changed_ok with note {d}: {n}")
        for outcome in ("unchanged", "ort_cannot_run", "unsupported"):
            reasons = Counter(_short(d) for o, d, _ in self.results.values() if o == outcome)
            if reasons:
                top = "; ".join(f"{r} x{n}" for r, n in reasons.most_common(6))
                lines.append(f"  {outcome} reasons: {top}" + (" ..." if len(reasons) > 6 else ""))
        for outcome in FAILURES:
            for n in self.names(outcome):
                lines.append(f"  {outcome.upper()} {n}: {self.results[n][1]}")
        return lines


def _short(detail: str) -> str:
    """A reason without the case-specific names (quoted) or long tails, to group cases."""
    return detail.split("'")[0].split(" node with name")[0][:140].rstrip(": ")


def run_corpus(
    cases: list[Case], *, workers: int = WORKERS, budget: float = CASE_BUDGET_S,
    make_passes: Callable[[], list[Any]] = default_passes,
) -> CorpusResult:
    """Classify ``cases`` in ``workers`` spawned processes; a case over ``budget`` seconds is killed (a hang).
    ``make_passes`` must be a module-level function (the workers import it by name)."""
    ctx = mp.get_context("spawn")
    out = CorpusResult(pipeline=tuple(p.name for p in make_passes()))
    todo = deque(cases)
    slots = [_Slot() for _ in range(max(1, min(workers, len(cases))))]

    def start(slot: _Slot) -> None:
        parent, child = ctx.Pipe()
        slot.proc = ctx.Process(target=_worker, args=(child, make_passes), daemon=True)
        slot.proc.start()
        child.close()
        slot.conn, slot.case = parent, None

    def stop(slot: _Slot) -> None:
        slot.proc.kill()
        slot.proc.join()
        slot.conn.close()

    t0 = time.perf_counter()
    for s in slots:
        start(s)
    try:
        while todo or any(s.case for s in slots):
            for s in slots:
                if s.case is None and todo:
                    s.case, s.started = todo.popleft(), time.perf_counter()
                    s.conn.send(s.case)
            busy = [s for s in slots if s.case]
            now = time.perf_counter()
            timeout = max(0.0, min(s.started + budget - now for s in busy))
            ready = wait([s.conn for s in busy], timeout=timeout)
            for s in busy:
                if s.conn in ready:
                    try:
                        name, outcome, detail, secs, stats = s.conn.recv()
                    except (EOFError, OSError):
                        code = s.proc.exitcode
                        out.results[s.case.name] = ("crash", f"worker process died (exit code {code})", 0.0)
                        stop(s)
                        start(s)
                        continue
                    out.results[name] = (outcome, detail, secs)
                    out.stats.update(stats)
                    s.case = None
                elif time.perf_counter() - s.started > budget:
                    out.results[s.case.name] = ("hang", f"over the {budget:.0f} s budget", budget)
                    stop(s)
                    start(s)
    finally:
        for s in slots:
            try:
                s.conn.send(None)
            except (OSError, ValueError):
                pass
            s.proc.join(timeout=5)
            if s.proc.is_alive():
                stop(s)
    out.seconds = time.perf_counter() - t0
    return out


# -- reporting in pytest's terminal summary --------------------------------------------------------------------------
class _SummaryPlugin:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.lines:
            terminalreporter.section("robustness corpus")
            for line in self.lines:
                terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def corpus_summary(request) -> list[str]:
    """Lines shown in pytest's terminal summary (registered at run time, so no conftest hook is needed)."""
    pm = request.config.pluginmanager
    plugin = pm.get_plugin("onnxopt-corpus-summary")
    if plugin is None:
        plugin = _SummaryPlugin()
        pm.register(plugin, "onnxopt-corpus-summary")
    return plugin.lines


def _check(result: CorpusResult, lines: list[str], title: str) -> None:
    summary = result.summary(title)
    lines.extend(summary)
    print("\n".join(summary))
    counts = result.counts()
    assert counts.get("changed_ok", 0) > 0, "the pipeline changed no case at all: the corpus exercises nothing"
    assert not any(counts.get(o) for o in FAILURES), "\n".join(summary)


# -- the harness catches what it must ---------------------------------------------------------------------------------
class _AddToSub(Pass):
    """Wrong rewrite: Add -> Sub."""

    name = "test-add-to-sub"

    def run(self, graph, ctx):
        nodes = [n for n in graph.nodes if n.op == "Add"]
        for n in nodes:
            n.op = "Sub"
        return PassResult(changed=bool(nodes))


class _Raises(Pass):
    name = "test-raises"

    def run(self, graph, ctx):
        raise KeyError("bug")


class _Lies(Pass):
    """Changes the graph but reports no change."""

    name = "test-lies"

    def run(self, graph, ctx):
        graph.nodes[0].name = graph.nodes[0].name + "_renamed"
        return PassResult(changed=False)


class _Sleeps(Pass):
    name = "test-sleeps"

    def run(self, graph, ctx):
        time.sleep(600)
        return PassResult(changed=False)


def _sleepy_passes() -> list[Any]:
    return [_Sleeps()]


def _case(name: str) -> Case:
    return next(c for c in corpus() if c.name == name)


@pytest.mark.parametrize(
    "make_passes,outcome",
    [(lambda: [_AddToSub()], "changed_wrong"), (lambda: [_Raises()], "crash"), (lambda: [_Lies()], "error"),
     (default_passes, "unchanged")],
    ids=["wrong_rewrite", "raises", "wrong_changed_flag", "default_pipeline"],
)
def test_harness_classifies(make_passes, outcome):
    assert classify(_case("test_add"), make_passes)[0] == outcome


def test_harness_kills_a_case_over_budget():
    result = run_corpus([_case("test_add"), _case("test_relu")], workers=1, budget=3.0, make_passes=_sleepy_passes)
    assert {n: o for n, (o, _, _) in result.results.items()} == {"test_add": "hang", "test_relu": "hang"}


def test_stratified_subset_is_deterministic_and_covers_every_op():
    cases = corpus()
    subset = stratified_subset(cases)
    assert [c.name for c in subset] == [c.name for c in stratified_subset(cases)]
    assert {op for c in cases for op in c.ops} == {op for c in subset for op in c.ops}
    assert len(subset) < len(cases) / 2


def test_corpus_subset(corpus_summary):
    subset = stratified_subset(corpus())
    result = run_corpus(subset)
    assert len(result.results) == len(subset)
    _check(result, corpus_summary, f"stratified subset (every {SUBSET_STRIDE}th case + every op type)")


@pytest.mark.slow
def test_corpus_full(corpus_summary):
    cases = corpus()
    result = run_corpus(cases)
    assert len(result.results) == len(cases)
    _check(result, corpus_summary, "full corpus")
