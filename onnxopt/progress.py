"""Progress bars for long work (calibration, least-squares recovery, block scoring): rich, on stderr, transient."""

from __future__ import annotations


class ProgressBar:
    """A rich progress bar on stderr when ``enabled`` (``ctx.progress``), otherwise nothing at all.

    Use as a context manager, or call :meth:`close`; :meth:`advance` moves it by ``n`` steps of ``total``.
    """

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.bar = None
        if not enabled or total <= 0:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(f"{label} {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.task = self.bar.add_task("", total=total)
        self.bar.start()

    def advance(self, n: int = 1, description: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=n, description=description)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
