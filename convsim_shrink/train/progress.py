"""The progress bars of training and pre-minimisation (rich, on the tool's console, rank 0 only)."""

from __future__ import annotations

from .distributed import is_main_process


def make_progress(quiet: bool = False):
    """A ``rich.progress.Progress`` with a ``{task.fields[info]}`` column; disabled when ``quiet`` or
    off rank 0."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..console import console

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=quiet or not is_main_process(),
        transient=False,
    )
