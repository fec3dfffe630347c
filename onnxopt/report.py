"""Run records -> rich tables and JSON."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from onnxopt.pass_manager import RunRecord


def human(n: float | int | None, unit: str = "") -> str:
    if n is None:
        return "-"
    if isinstance(n, float) and not math.isfinite(n):
        return str(n)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}" if isinstance(n, float) else f"{n}{unit}"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n} B"


def _fmt_stats(stats: dict[str, Any]) -> str:
    """``k=v`` items, leaving out zero counters (a zero ``skipped_x`` or ``removed_x`` says nothing)."""
    return ", ".join(f"{k}={v}" for k, v in stats.items() if not (isinstance(v, (int, float)) and v == 0))


#: Summary keys shown in the pass table, with their formatter. Keys missing from a summary are skipped.
SUMMARY_COLUMNS: list[tuple[str, str, Any]] = [
    ("nodes", "nodes", str),
    ("params", "params", human),
    ("macs", "MACs", human),
    ("weight_bytes", "weights", human_bytes),
]


def _arrow(before: Any, after: Any, fmt) -> str:
    if before == after:
        return fmt(after)
    return f"{fmt(before)} → {fmt(after)}"


def pass_table(record: RunRecord) -> Table:
    table = Table(title="passes", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("pass")
    table.add_column("changed")
    table.add_column("time", justify="right")
    cols = [(k, label, fmt) for k, label, fmt in SUMMARY_COLUMNS if k in record.before]
    for _, label, _ in cols:
        table.add_column(label, justify="right")
    for i, p in enumerate(record.passes, 1):
        table.add_row(
            str(i), p.name, "yes" if p.changed else "no", f"{p.seconds:.3f}s",
            *[_arrow(p.before.get(k), p.after.get(k), fmt) for k, _, fmt in cols],
        )
    note = record.after.get("macs_note") or record.before.get("macs_note")
    if note and any(k == "macs" for k, _, _ in cols):
        table.caption = f"MACs: {note}"
    if record.passes:
        table.add_row(
            "", "total", "yes" if any(p.changed for p in record.passes) else "no",
            f"{sum(p.seconds for p in record.passes):.3f}s",
            *[_arrow(record.before.get(k), record.after.get(k), fmt) for k, _, fmt in cols], end_section=True,
        )
    return table


def stats_lines(record: RunRecord) -> list[str]:
    """One line per pass with its non-zero stats (the JSON record has all of them)."""
    return [f"{i}. {p.name}: {_fmt_stats(p.stats) or '(no stats)'}" for i, p in enumerate(record.passes, 1)]


def validation_table(validation: dict[str, Any]) -> Table:
    title = f"validation ({validation.get('mode', 'ONNX Runtime, optimizations off')})"
    table = Table(title=title, title_justify="left")
    top1 = any(o.get("top1_agreement") is not None for o in validation["outputs"])
    cols = ["output", "max abs", "max rel", "rel L2", "cosine", "SQNR dB", "NaN/Inf"] + (["top-1 agree"] if top1 else [])
    for col in cols + ["status"]:
        table.add_column(col, justify="right" if col not in ("output", "status") else "left")
    for o in validation["outputs"]:
        agree = o.get("top1_agreement")
        table.add_row(
            o["name"], f"{o['max_abs']:.3g}", f"{o['max_rel']:.3g}", f"{o['rel_l2']:.3g}", f"{o['cosine']:.6f}",
            "inf" if o["sqnr_db"] == math.inf else f"{o['sqnr_db']:.1f}", str(o["nonfinite_new"]),
            *([f"{100 * agree:.2f}%" if agree is not None else "-"] if top1 else []),
            "ok" if o["ok"] else f"FAIL: {o['reason']}",
        )
    for k, v in validation.get("extra", {}).items():
        table.caption = (table.caption + "; " if table.caption else "") + f"{k}: {v}"
    return table


def print_record(record: RunRecord, console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    console.print(pass_table(record))
    for line in stats_lines(record):
        console.print(line, soft_wrap=True, highlight=False)
    if record.validation:
        console.print(validation_table(record.validation))
    for note in record.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(data), f, indent=2)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
