"""A progress bar with rate and ETA for indexing on a terminal (rich); silent when not a TTY."""

from __future__ import annotations


class ProgressDisplay:
    """Implements the indexer's progress protocol with a rich progress bar on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None
        self._task = None
        self.failures = 0

    def __enter__(self) -> "ProgressDisplay":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]indexing"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[failed]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, total: int) -> None:
        """Set the number of files to process."""
        if self._progress is not None:
            self._task = self._progress.add_task("index", total=total, rate="", failed="")

    def advance(self, count: int = 1) -> None:
        """Count processed files."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, count)
            task = self._progress.tasks[0]
            speed = task.speed
            self._progress.update(self._task, rate=f"{speed:.1f} img/s" if speed else "")

    def failed(self, path: str, reason: str) -> None:
        """Count a failed file (listed in the summary)."""
        self.failures += 1
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, failed=f"[yellow]{self.failures} failed")
