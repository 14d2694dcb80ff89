"""The progress bars of training and pre-minimisation (rich, on the tool's console, rank 0 only)."""

from __future__ import annotations

from .distributed import is_main_process


def make_progress(quiet: bool = False):
    """A ``rich.progress.Progress`` with a ``{task.fields[info]}`` column; disabled when ``quiet`` or
    off rank 0.  Written to a file or pipe (not a terminal) a live bar shows nothing until it stops, so
    there the bar is off and ``progress.plain`` is True: the caller prints a line per finished task
    (:func:`print_finished`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..console import console

    live = not quiet and is_main_process()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not live or not console.is_terminal,
        transient=False,
    )
    progress.plain = live and not console.is_terminal
    return progress


def print_finished(progress, task) -> None:
    """One plain line for a finished ``task`` where the bar is not shown live (a log file, a pipe)."""
    if getattr(progress, "plain", False):
        from ..console import console

        t = progress.tasks[task]
        elapsed = f" ({t.elapsed:.0f} s)" if t.elapsed is not None else ""
        console.print(f"{t.description}: {t.fields.get('info', '').strip()}{elapsed}", soft_wrap=True, markup=False)
