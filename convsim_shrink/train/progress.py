"""The progress bars of training and pre-minimisation (rich, on the tool's console, rank 0 only)."""

from __future__ import annotations

import time

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
    progress.plain_last = time.monotonic()
    return progress


PLAIN_EVERY_S = 30.0  # off a terminal, a running task prints a line this often, so a log never looks hung


def print_running(progress, task, every_s: float | None = None) -> None:
    """Where the bar is not shown live (a log file, a pipe), one plain line for a running ``task`` at most
    every ``every_s`` seconds (default :data:`PLAIN_EVERY_S`): ``train 3/30: 120/469 loss 0.412  train acc 86.1%  640 img/s (61 s)``."""
    if not getattr(progress, "plain", False):
        return
    now = time.monotonic()
    if now - progress.plain_last < (PLAIN_EVERY_S if every_s is None else every_s):
        return
    progress.plain_last = now
    from ..console import console

    t = progress.tasks[task]
    total = f"/{t.total:.0f}" if t.total is not None else ""
    elapsed = f" ({t.elapsed:.0f} s)" if t.elapsed is not None else ""
    console.print(f"{t.description}: {t.completed:.0f}{total} {t.fields.get('info', '').strip()}{elapsed}", soft_wrap=True, markup=False)


def print_finished(progress, task) -> None:
    """One plain line for a finished ``task`` where the bar is not shown live (a log file, a pipe)."""
    if getattr(progress, "plain", False):
        from ..console import console

        t = progress.tasks[task]
        elapsed = f" ({t.elapsed:.0f} s)" if t.elapsed is not None else ""
        console.print(f"{t.description}: {t.fields.get('info', '').strip()}{elapsed}", soft_wrap=True, markup=False)
        progress.plain_last = time.monotonic()


def duration_text(seconds: float) -> str:
    """``'45 s'``, ``'12 min'`` or ``'1.5 h'``: a rough duration for an estimate."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
