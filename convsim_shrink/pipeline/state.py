"""The run state: what a run has done and measured so far, typed, and written as ``state.json``.

The runner records every finished stage here (its seconds, its metrics, its per-layer numbers, its
training history) and saves the file atomically after each stage; a resumed run reads it back, and the
report is built from it.  ``state.json`` keeps the layout it had as an untyped dict (``completed``,
``seconds``, ``metrics``, ``layers``, ``history_train``, ``history_finetune``, ``exports``), so run
directories from before the change still resume.  No torch here: the file is plain JSON.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..io import atomic_write_text


@dataclass
class ModelSize:
    """Parameters and multiply-accumulates (per image) of a model."""

    params: int
    macs: int


@dataclass
class Metrics:
    """Scalar results by stage; ``None`` = not measured (yet).  Accuracies are top-1 percent on the
    test split in fp32; CS values are the normalized Convolutional Similarity summed over conv layers."""

    source: str | None = None  # build: where the model came from, one line
    dense_note: str | None = None  # a pretrained model: which dense stages were skipped, and why
    dtype_note: str | None = None  # a half-precision model: trained in float32
    dense_size: ModelSize | None = None  # build
    cs_init: float | None = None
    cs_after_premin: float | None = None  # premin
    premin_steps: int | None = None
    dense_accuracy: float | None = None  # train
    cs_after_train: float | None = None
    prune_note: str | None = None  # prune
    pruning_plan: dict[str, Any] | None = None  # prune.safety.IgnorePlan.to_dict(): the layers left unpruned, with reasons
    pruned_accuracy: float | None = None
    #: top-1 after each step of the prune stage ("dropped", "compensated", "bn"), on ``prune_steps_split``
    prune_steps: dict[str, float] | None = None
    prune_steps_split: str | None = None
    compensation: str | None = None  # compensation.CompensationReport.summary(), when the prune stage compensated
    shrunk_size: ModelSize | None = None
    channel_ratio: float | None = None
    shrunk_accuracy: float | None = None  # finetune
    cs_shrunk: float | None = None
    onnx_max_abs_diff: float | None = None  # export
    pt2_max_abs_diff: float | None = None
    int8: dict[str, Any] | None = None  # onnx-int8: top-1 of the fp32 and int8 ONNX models under onnxruntime
    speed: list[dict[str, Any]] | None = None  # dense vs shrunk latency rows (deploy.speed_rows)
    #: prune.max_accuracy_drop: the size search's candidates and choice (sizesearch.SearchRecord.to_dict())
    search: dict[str, Any] | None = None
    chance_note: str | None = None  # the dense model's top-1 is near chance
    validation_note: str | None = None  # images the run held out of training for the size search's validation

    def to_dict(self) -> dict[str, Any]:
        """The measured values only (the form stored in state.json and in exported models' headers)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metrics:
        data = dict(data)
        for key in ("dense_size", "shrunk_size"):
            if data.get(key) is not None:
                data[key] = ModelSize(**data[key])
        return cls(**data)


@dataclass
class LayerStats:
    """Per-layer numbers by layer name: output channels and normalized CS at each point of the run."""

    channels_dense: dict[str, int] = field(default_factory=dict)
    cs_init: dict[str, float] = field(default_factory=dict)
    cs_after_premin: dict[str, float] = field(default_factory=dict)
    cs_after_train: dict[str, float] = field(default_factory=dict)
    channels_shrunk: dict[str, int] = field(default_factory=dict)
    cs_shrunk: dict[str, float] = field(default_factory=dict)


@dataclass
class RunState:
    """Everything a run has recorded; see the module docstring."""

    completed: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    layers: LayerStats = field(default_factory=LayerStats)
    history_train: list[dict[str, float]] = field(default_factory=list)
    history_finetune: list[dict[str, float]] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)
    #: the processes of the latest start: world_size, backend, global_batch, per_process_batch
    processes: dict[str, Any] = field(default_factory=dict)

    def finish(self, stage: str, seconds: float) -> None:
        """Mark ``stage`` done after ``seconds`` of work."""
        if stage not in self.completed:
            self.completed.append(stage)
        self.seconds[stage] = round(seconds, 3)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["metrics"] = self.metrics.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        data = dict(data)
        data["metrics"] = Metrics.from_dict(data.get("metrics", {}))
        data["layers"] = LayerStats(**data.get("layers", {}))
        return cls(**data)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> RunState:
        """Read ``state.json``; a missing, damaged or foreign file is a :class:`CheckpointError`."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path.parent} is not a run directory (no state.json); check the path given to --resume")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, AttributeError):
            raise CheckpointError(f"{path} is damaged; start a new run") from None
