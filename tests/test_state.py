"""The typed run state: state.json round-trips, keeps the layout older runs wrote, and damage is a clear error."""

import json

import pytest

from convsim_shrink.errors import CheckpointError
from convsim_shrink.pipeline.state import LayerStats, Metrics, ModelSize, RunState

# state.json as the untyped pipeline wrote it before the run state was typed (trimmed)
OLD = {
    "completed": ["build", "premin", "train"],
    "seconds": {"build": 0.1, "premin": 1.5, "train": 12.0},
    "metrics": {"dense_size": {"params": 1000, "macs": 5000}, "cs_init": 9.5, "cs_after_premin": 2.5, "premin_steps": 20,
                "dense_accuracy": 81.25, "cs_after_train": 3.0},
    "layers": {"channels_dense": {"features.0": 8}, "cs_init": {"features.0": 1.0}, "cs_after_premin": {"features.0": 0.5},
               "cs_after_train": {"features.0": 0.7}},
    "history_train": [{"train_loss": 1.0, "train_acc": 50.0, "epoch": 1}],
}


def test_old_state_file_reads_into_the_typed_state(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps(OLD))
    state = RunState.load(path)
    assert state.completed == ["build", "premin", "train"]
    assert state.metrics.dense_size == ModelSize(1000, 5000) and state.metrics.dense_accuracy == 81.25
    assert state.metrics.shrunk_accuracy is None and state.history_finetune == [] and state.exports == {}
    assert state.layers.channels_dense == {"features.0": 8}


def test_round_trip_keeps_every_field_and_writes_only_measured_metrics(tmp_path):
    state = RunState.from_dict(OLD)
    state.metrics.prune_note = "landed low"
    state.metrics.shrunk_size = ModelSize(500, 2000)
    state.finish("prune", 2.34567)
    state.save(tmp_path / "state.json")
    raw = json.loads((tmp_path / "state.json").read_text())
    assert set(raw) == {"completed", "seconds", "metrics", "layers", "history_train", "history_finetune", "exports", "processes"}
    assert "shrunk_accuracy" not in raw["metrics"] and raw["metrics"]["shrunk_size"] == {"params": 500, "macs": 2000}
    assert raw["seconds"]["prune"] == 2.346 and raw["completed"][-1] == "prune"
    assert RunState.load(tmp_path / "state.json") == state


def test_finishing_a_stage_twice_lists_it_once():
    state = RunState()
    state.finish("build", 1.0)
    state.finish("build", 2.0)
    assert state.completed == ["build"] and state.seconds == {"build": 2.0}


@pytest.mark.parametrize("text", ["{not json", json.dumps({"completed": [], "metrics": {"no_such_metric": 1}}), "[1, 2]"])
def test_damaged_state_is_a_clear_error(tmp_path, text):
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(CheckpointError, match="is damaged; start a new run"):
        RunState.load(path)


def test_missing_state_names_the_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is not a run directory"):
        RunState.load(tmp_path / "state.json")


def test_metrics_and_layers_default_to_unmeasured():
    assert Metrics().to_dict() == {} and LayerStats().cs_shrunk == {}
