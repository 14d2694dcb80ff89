"""The plan of layers to leave unpruned, each with its reason, and the error pruning raises."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ...errors import ConvSimError

#: what each static rule is about, as a reason's object
OPS = {
    "reshape": "a reshape that splits or merges the channel dimension (e.g. a channel shuffle)",
    "pixel-shuffle": "a pixel shuffle (channels become space)",
    "split-cat": "a channel split whose pieces are concatenated again",
}
REASONS = {
    "output": "produces the model's output; pruning it would change the output shape",
    **{kind: f"feeds {what}, which torch-pruning cannot map" for kind, what in OPS.items()},
    "train-only": "feeds a layer that runs only in training mode (e.g. an auxiliary head), which torch-pruning does not trace",
}




class PruningError(ConvSimError):
    """Torch-pruning failed on this model, or the pruned model no longer runs or changed its outputs."""


# ------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Ignored:
    """One layer left unpruned: its name in ``model.named_modules()``, the rule, and a one-line reason."""

    name: str
    kind: str
    reason: str


@dataclass
class IgnorePlan:
    """The layers to leave unpruned, each with its reason.

    Iterating a plan yields the *modules* of the model it was made for, so it can be passed as
    ``ignored_layers=plan`` to :func:`convsim_shrink.prune.search.prune_to_target`; for a copy of that model
    use :meth:`for_model`.  ``trials`` counts the trial prunings run to make it.
    """

    entries: list[Ignored] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    trials: int = 0
    refused: str | None = None  # set when nothing in the model can be pruned safely

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return any(e.name == name for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def layers(self) -> list[nn.Module]:
        """The ignored modules of the model the plan was made for."""
        if self.model is None:
            return []
        return self.modules(self.model)

    def modules(self, model: nn.Module) -> list[nn.Module]:
        """The ignored modules looked up by name in ``model`` (a copy of the planned model)."""
        found = dict(model.named_modules())
        return [found[e.name] for e in self.entries if e.name in found]

    def for_model(self, model: nn.Module) -> "IgnorePlan":
        """The same plan bound to ``model`` (e.g. a deep copy), so iterating it yields that model's modules."""
        return IgnorePlan(list(self.entries), model, self.trials, self.refused)

    def add(self, name: str, kind: str, reason: str | None = None) -> bool:
        if name in self:
            return False
        self.entries.append(Ignored(name, kind, reason or REASONS[kind]))
        return True

    def left_alone(self) -> list[Ignored]:
        """Entries beyond the output layers (the layers a user would not expect to stay whole)."""
        return [e for e in self.entries if e.kind != "output"]

    def summary(self) -> str:
        """One line for the console and the report, e.g. ``left 3 layers unpruned: classifier.1 (produces
        the model's output); stage2.0.branch2.5, stage2.1.branch2.5 (feed a reshape ...)``."""
        if self.refused:
            return f"cannot prune this model: {self.refused}"
        if not self.entries:
            return "every layer can be pruned"
        by_reason: dict[str, list[str]] = {}
        for e in self.entries:
            by_reason.setdefault(e.reason, []).append(e.name)
        parts = []
        for reason, names in by_reason.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            parts.append(f"{shown} ({reason})")
        n = len(self.entries)
        return f"left {n} layer{'s' if n != 1 else ''} unpruned: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ignored": [{"layer": e.name, "rule": e.kind, "reason": e.reason} for e in self.entries],
            "trials": self.trials,
            "refused": self.refused,
        }
