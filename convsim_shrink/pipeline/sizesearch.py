"""``--max-drop D`` (``prune.max_accuracy_drop``): the smallest model within D points of the dense one.

Instead of a fixed size target, the prune stage first searches for one: candidates are sizes ``t``
(fractions of the dense model's parameters, MACs or measured latency: ``prune.search_kind``), each
pruned from the dense model, fine-tuned for a short budget (``prune.search_epochs``) and scored on the
*validation* split.  A candidate passes when its validation top-1 is at most D points below the dense
model's.  Bisection on ``t`` keeps the smallest size known to pass (``hi``, the dense model at first)
and the largest known to fail (``lo``, the floor at first) and stops when they are
``prune.search_resolution`` apart (or after :attr:`SearchSettings.max_candidates`); the winner, ``hi``,
is then pruned once more and fine-tuned with the full budget (``finetune.epochs``) by the ordinary stages.
This assumes top-1 falls with size (a size that passes has no failing size above it); the report lists
every candidate, so a user sees where that did not hold.

Validation is never the test set: ``data.val_split`` when the recipe has one, else
:func:`with_validation` holds images out of training and says how many.  The test top-1 of each
candidate is measured anyway (the fine-tuning stage does) and reported beside, not used.

:func:`bisect_size` is the search alone, over any ``evaluate(t)`` (tested with a fake accuracy curve);
:func:`search_size` runs it on the product's stages.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError, TargetUnreachableError

#: the smallest size the search tries (a fraction of the dense model)
FLOOR = 0.02


@dataclass(frozen=True)
class SearchSettings:
    """How the search runs: pass when ``dense - top1 <= max_drop`` (points); sizes in (``floor``, 1);
    stop when the bracket is narrower than ``resolution`` or after ``max_candidates`` evaluations."""

    max_drop: float
    resolution: float = 0.05
    floor: float = FLOOR
    max_candidates: int = 8


@dataclass
class Candidate:
    """One size tried: its target, what it measured (ratios of the dense model; top-1 in percent) and
    whether it passed.  ``note``: why it could not be made (an unreachable target counts as a failure)."""

    target: float
    passed: bool
    val_top1: float | None = None
    test_top1: float | None = None
    top1_before_finetune: float | None = None
    params_ratio: float | None = None
    macs_ratio: float | None = None
    latency_ratio: float | None = None
    epochs: int = 0
    seconds: float = 0.0
    note: str | None = None


def bisect_size(evaluate: Callable[[float], Candidate], settings: SearchSettings) -> tuple[float | None, list[Candidate]]:
    """The smallest passing size by bisection on ``t`` in (``settings.floor``, 1), and every candidate
    evaluated, in order.  ``evaluate(t)`` returns a :class:`Candidate` for target ``t``.  Returns ``None``
    as the size when no candidate passed (only the dense model is within the drop).

    Targets are rounded to 4 decimals; a target evaluated before is not evaluated again."""
    lo, hi = settings.floor, 1.0
    tried: dict[float, Candidate] = {}
    while hi - lo > settings.resolution and len(tried) < settings.max_candidates:
        t = round((lo + hi) / 2, 4)
        if t in tried:
            break
        tried[t] = c = evaluate(t)
        if c.passed:
            hi = t
        else:
            lo = t
    return (hi if hi < 1.0 else None), list(tried.values())


@dataclass
class SearchRecord:
    """What the search did, for ``state.json`` and the report (``report.json["size_search"]``)."""

    kind: str
    max_drop: float
    split: str  # "val_split" (the recipe's) or "held out" (images the run held out of training itself)
    val_images: int | None
    dense_val_top1: float
    candidates: list[Candidate] = field(default_factory=list)
    target: float | None = None  # the winner's size target; None: no candidate passed
    search_epochs: int = 0
    fine_tunings: int = 0  # candidates fine-tuned (with search_epochs > 0), plus the winner's full budget
    winner_val_top1: float | None = None  # after the full budget
    winner_test_top1: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchRecord:
        data = dict(data)
        data["candidates"] = [Candidate(**c) for c in data.get("candidates", [])]
        return cls(**data)

    @property
    def met(self) -> bool | None:
        """Whether the winner, after its full fine-tuning, is within the drop on validation."""
        if self.winner_val_top1 is None:
            return None
        return self.dense_val_top1 - self.winner_val_top1 <= self.max_drop


def held_out_images(recipe) -> int:
    """Images :func:`with_validation` holds out: 5,000 of a full data set (Fashion-MNIST: 60,000), a tenth
    of ``data.subset`` (at least 10) otherwise."""
    subset = recipe.data.subset
    return max(10, subset // 10) if subset else 5000


def with_validation(recipe) -> tuple[Any, str | None]:
    """``recipe`` with a validation split for the search: unchanged when ``data.val_split`` > 0, else
    with :func:`held_out_images` held out of training (``data.val_split`` set, so ``recipe.yaml`` and a
    resumed run hold out the same images), and the line that says so."""
    if recipe.prune.max_accuracy_drop is None or recipe.data.val_split:
        return recipe, None
    n = held_out_images(recipe)
    data = recipe.data.model_copy(update={"val_split": n})
    note = (f"max_accuracy_drop chooses on validation: {n} training images held out of training and fine-tuning "
            f"(data.val_split was 0; set it to choose how many)")
    return recipe.model_copy(update={"data": data}), note


def size_target_config(prune, kind: str, target: float):
    """``prune`` with the one size target ``kind`` = ``target`` (the others off) and no search."""
    update = {"target_params": None, "target_macs": None, "target_latency": None, f"target_{kind}": target, "max_accuracy_drop": None}
    return prune.model_copy(update=update)


def search_size(
    dense,
    data,
    recipe,
    *,
    example_inputs,
    device,
    reuse=None,
    quiet: bool = True,
    record: SearchRecord | None = None,
    on_candidate: Callable[[SearchRecord], None] | None = None,
    log: Callable[[str], None] = lambda msg: None,
    held_out: bool = False,
) -> SearchRecord:
    """Run the search on the product's stages: each candidate is
    :func:`~convsim_shrink.pipeline.stages.prune_stage` (with ``reuse``: the dense model calibrated once) and
    :func:`~convsim_shrink.pipeline.stages.finetune_stage` for ``prune.search_epochs`` epochs, scored on
    ``data.val``.  ``held_out``: the validation images were held out by the run
    (:func:`with_validation`), not the recipe's own split.  ``record``: a search begun before (a resumed run); its candidates are not run again.
    ``on_candidate(record)`` after each candidate (the runner saves its state).  Returns the record with
    ``target`` set (the winner), or None and a note when no candidate passed.

    Raises :class:`ConfigError` when ``data.val`` is None (give a validation split) and what the stages
    raise (:class:`TargetUnreachableError` is a failed candidate, not an error)."""
    from ..train import evaluate, resolve_precision
    from . import stages

    pr, ft = recipe.prune, recipe.finetune
    if data.val is None:
        raise ConfigError("prune.max_accuracy_drop chooses on a validation split, and the data has none; "
                          "set data.val_split (or pass validation data)")
    precision = resolve_precision(device, "fp32", ft.channels_last)
    if record is None:
        dense_val = evaluate(dense, data.val, precision)["acc"]
        record = SearchRecord(
            kind=pr.search_kind, max_drop=pr.max_accuracy_drop, split="held out" if held_out else "val_split", val_images=getattr(data.val, "num_samples", None),
            dense_val_top1=dense_val, search_epochs=min(pr.search_epochs, ft.epochs),
        )
    done = {c.target: c for c in record.candidates}
    short = ft.model_copy(update={"epochs": record.search_epochs})

    def candidate(t: float) -> Candidate:
        if t in done:
            return done[t]
        t0 = time.perf_counter()
        try:
            pruned = stages.prune_stage(dense, data, size_target_config(pr, pr.search_kind, t), example_inputs=example_inputs,
                                        finetune=ft, device=device, quiet=True, reuse=reuse)
        except TargetUnreachableError as exc:
            c = Candidate(t, False, note=str(exc), seconds=round(time.perf_counter() - t0, 3))
        else:
            res = pruned.result
            out = stages.finetune_stage(pruned.model, dense, data, short, device=device, quiet=quiet)
            val = evaluate(out.model, data.val, precision)["acc"]
            c = Candidate(
                t, record.dense_val_top1 - val <= record.max_drop, val_top1=val, test_top1=out.accuracy,
                top1_before_finetune=pruned.accuracy, params_ratio=res.params_ratio, macs_ratio=res.macs_ratio,
                latency_ratio=res.latency_ratio, epochs=short.epochs, seconds=round(time.perf_counter() - t0, 3),
            )
            if short.epochs:
                record.fine_tunings += 1
        record.candidates.append(c)
        log(f"size search: {pr.search_kind} {t:g} -> " + (f"validation top-1 {c.val_top1:.2f} (dense {record.dense_val_top1:.2f}): "
                                                           f"{'within' if c.passed else 'more than'} {record.max_drop:g} points"
                                                           if c.val_top1 is not None else f"not reachable ({c.note})"))
        if on_candidate is not None:
            on_candidate(record)
        return c

    settings = SearchSettings(pr.max_accuracy_drop, resolution=pr.search_resolution)
    record.target, _ = bisect_size(candidate, settings)
    record.candidates = _unique(record.candidates)
    if record.target is None:
        record.note = (f"no pruned size tried was within {record.max_drop:g} points of the dense model on validation; "
                       f"the largest tried is kept")
        reached = [c for c in record.candidates if c.val_top1 is not None]
        if not reached:
            raise TargetUnreachableError(f"no size the search tried could be pruned to ({record.candidates[-1].note})")
        record.target = max(c.target for c in reached)
    return record


def _unique(candidates: list[Candidate]) -> list[Candidate]:
    seen: dict[float, Candidate] = {}
    for c in candidates:
        seen.setdefault(c.target, c)
    return list(seen.values())


def winner_finished(search: dict[str, Any], model, val, finetune, test_top1: float, device) -> dict[str, Any]:
    """The record (``search``, as stored) with the winner's validation top-1 after its full fine-tuning,
    its test top-1 (``test_top1``, beside) and the fine-tuning counted (``finetune.epochs`` > 0)."""
    from ..train import evaluate, resolve_precision

    record = SearchRecord.from_dict(search)
    record.winner_val_top1 = evaluate(model, val, resolve_precision(device, "fp32", finetune.channels_last))["acc"]
    record.winner_test_top1 = test_top1
    if finetune.epochs:
        record.fine_tunings += 1
    return record.to_dict()


def winner_config(prune, record: SearchRecord):
    """The prune settings of the winner: its one size target, the search off (what ``recipe.yaml`` records)."""
    return size_target_config(copy.copy(prune), record.kind, record.target)


__all__ = ["Candidate", "SearchRecord", "SearchSettings", "bisect_size", "held_out_images", "search_size", "size_target_config", "winner_config", "winner_finished", "with_validation"]
