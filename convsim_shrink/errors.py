"""The library's own exception types.

Everything a user can cause (a typo in a recipe, a missing data set, an unreadable checkpoint, an
unreachable pruning target) raises a subclass of :class:`ConvSimError` with a message of one line that
names the problem and the fix.  The command line catches this base class, prints the message and exits
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ConvSimError(Exception):
    """Base class of every error the user can fix."""


class ConfigError(ConvSimError, ValueError):
    """A recipe, an option or an argument is wrong (unknown name, bad value, unknown key)."""


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup failed; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataNotFoundError(ConvSimError, FileNotFoundError):
    """A data set is not where we looked; the message says where we looked and how to get it."""


class CheckpointError(ConvSimError):
    """A checkpoint or export is missing, corrupt, truncated, foreign or untrusted."""


class TargetUnreachableError(ConvSimError):
    """A pruning target cannot be met; the message gives the smallest reachable size."""


class TrainingDivergedError(ConvSimError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class MissingDependencyError(ConvSimError, ImportError):
    """A package that a requested feature needs is not installed or does not work; the message names
    the package and the command that installs it."""


class OutOfMemoryError(ConvSimError, MemoryError):
    """The machine ran out of memory for a step whose size the model sets (the target search's pruned copies);
    the message names the step and the model's size."""


class OutputNotWritableError(ConvSimError, OSError):
    """The run directory cannot be created or written (a file in the way, a read-only or full disk)."""


def closest(name: str, choices) -> str | None:
    """The choice closest to ``name`` (for 'did you mean' hints), or None."""
    import difflib

    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def unknown(kind: str, name: str, choices) -> UnknownNameError:
    """An :class:`UnknownNameError` that lists the known names and the closest one."""
    choices = sorted(choices)
    hint = closest(name, choices)
    did_you_mean = f" Did you mean '{hint}'?" if hint else ""
    return UnknownNameError(f"unknown {kind} '{name}'.{did_you_mean} Known: {', '.join(choices)}.")


def first_line(exc: BaseException, limit: int = 160, *, with_type: bool = False) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters, after ``TypeName: `` when
    ``with_type``; its type's name alone when it has no message.  How a foreign error is quoted inside
    one of ours."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0][:limit]
    return f"{type(exc).__name__}: {line}" if with_type else line
