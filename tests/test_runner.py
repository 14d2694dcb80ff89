"""The runner owns the order, skipping and resuming; the stages it calls are tested in test_stages.py.

Fast: a tiny model, 0-epoch training stages and a small slice of real Fashion-MNIST.
"""

import json

import pytest
import torch

import convsim_shrink.pipeline.runner as runner
import convsim_shrink.pipeline.stages as stages
from convsim_shrink.console import console
from convsim_shrink.errors import CheckpointError, ConfigError
from convsim_shrink.export import native as ckpt
from convsim_shrink.export.load import load
from convsim_shrink.pipeline.report import build_report
from convsim_shrink.pipeline.runner import STAGES, Runner, resumable
from convsim_shrink.pipeline.state import RunState
from convsim_shrink.recipe import resolve

SETS = [
    "model.name=simple_cnn", "model.width=0.25", "data.subset=200", "data.test_subset=100", "premin.steps=3",
    "train.epochs=0", "finetune.epochs=0", "prune.bn_recalibration=2", "prune.round_to=null",
    "export.formats=[convsim]", "run.quiet=true", "run.device=cpu",
]

#: the keys of report.json (its content must not change with the pipeline's wiring)
REPORT_KEYS = {
    "model", "recipe", "width", "dataset", "test_images", "criterion", "global_pruning", "distill", "finetune_epochs", "target", "dense", "shrunk",
    "params_ratio", "macs_ratio", "accuracy_delta", "cs", "cs_beta", "stages", "total_seconds", "exports", "onnx_max_abs_diff", "pt2_max_abs_diff", "int8", "speed", "target_latency",
    "source", "ignored_layers", "data_notes", "notes",
    "world_size", "global_batch", "per_process_batch", "prune_steps", "compensate", "compensation", "size_search",
}


def test_stages_are_the_runners_list():
    assert STAGES == ("build", "premin", "train", "prune", "finetune", "export")


@pytest.mark.parametrize("completed,kept", [
    ([], []),
    (["build"], []),  # the built model lived in memory only: build again (with pre-minimisation)
    (["build", "premin"], ["build", "premin"]),
    (["build", "premin", "train", "prune"], ["build", "premin", "train", "prune"]),
    (list(STAGES), list(STAGES)),
    (["build", "premin", "prune"], ["build", "premin"]),  # only a finished prefix counts
])
def test_resumable_keeps_the_finished_prefix_that_left_a_model(completed, kept):
    assert resumable(completed) == kept


class Spy:
    """Wraps the stage functions the runner calls and records which ran."""

    def __init__(self, monkeypatch, fail: str | None = None):
        self.calls: list[str] = []
        for name in STAGES:
            real = getattr(stages, f"{name}_stage")  # the real function, not an earlier spy

            def wrapped(*args, _name=name, _real=real, **kw):
                self.calls.append(_name)
                if _name == fail:
                    raise KeyboardInterrupt
                return _real(*args, **kw)

            monkeypatch.setattr(runner, f"{name}_stage", wrapped)


def test_interrupted_run_resumes_after_the_last_finished_stage(tmp_path, monkeypatch, fashion_dir):
    out = tmp_path / "run"
    recipe = resolve(None, sets=SETS)
    spy = Spy(monkeypatch, fail="prune")
    with pytest.raises(KeyboardInterrupt):
        Runner(recipe, out).run()
    assert spy.calls == ["build", "premin", "train", "prune"]
    state = RunState.load(out / "state.json")
    assert state.completed == ["build", "premin", "train"] and state.metrics.dense_accuracy is not None
    dense_file = out / "dense.safetensors"
    assert ckpt.read_metadata(dense_file)["input_shape"] == [1, 28, 28]
    stamp = dense_file.stat().st_mtime_ns

    spy = Spy(monkeypatch)
    result = Runner(recipe, out, resume=True).run()
    assert spy.calls == ["prune", "finetune", "export"]  # nothing finished is repeated
    assert dense_file.stat().st_mtime_ns == stamp
    dense = load(dense_file)
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), result.dense_model.state_dict().values()))
    report = json.loads((out / "report.json").read_text())
    assert set(report) == REPORT_KEYS | {"plots"} and list(report["stages"]) == list(STAGES)
    assert 0.49 <= report["params_ratio"] <= 0.5

    spy = Spy(monkeypatch)
    again = Runner(recipe, out, resume=True).run()  # a finished run: nothing runs, the models come back
    assert spy.calls == [] and again.report == result.report
    assert sum(p.numel() for p in again.model.parameters()) == report["shrunk"]["params"]


def test_resume_before_premin_finished_starts_over(tmp_path, monkeypatch, fashion_dir):
    out = tmp_path / "run"
    recipe = resolve(None, sets=SETS)
    Spy(monkeypatch, fail="premin")
    with pytest.raises(KeyboardInterrupt):
        Runner(recipe, out).run()
    assert RunState.load(out / "state.json").completed == ["build"]
    spy = Spy(monkeypatch, fail="train")
    with pytest.raises(KeyboardInterrupt):
        Runner(recipe, out, resume=True).run()
    assert spy.calls == ["build", "premin", "train"]


def test_missing_model_file_is_a_clear_error_on_resume(tmp_path, monkeypatch, fashion_dir):
    out = tmp_path / "run"
    recipe = resolve(None, sets=SETS)
    Spy(monkeypatch, fail="prune")
    with pytest.raises(KeyboardInterrupt):
        Runner(recipe, out).run()
    (out / "dense.safetensors").unlink()
    with pytest.raises(CheckpointError, match="dense.safetensors is missing"):
        Runner(recipe, out, resume=True).run()


def test_without_a_run_directory_nothing_is_written_and_export_is_skipped(tmp_path, monkeypatch, fashion_dir):
    monkeypatch.chdir(tmp_path)
    spy = Spy(monkeypatch)
    result = Runner(resolve(None, sets=SETS)).run()
    assert spy.calls == ["build", "premin", "train", "prune", "finetune"]
    assert list(tmp_path.iterdir()) == [] and result.run_dir is None
    assert set(result.report) == REPORT_KEYS and result.report["exports"] == {}


def test_post_training_path_reports_top1_through_the_prune_stage(tmp_path, monkeypatch, fashion_dir):
    """finetune.epochs=0 (the post-training path): the report says how top-1 moved at each step of pruning,
    and the shrunk model is the compensated, refitted (prune.compensation_refit left to the run: on with no
    fine-tuning), BN re-estimated one."""
    monkeypatch.chdir(tmp_path)
    with console.capture() as cap:
        result = Runner(resolve(None, sets=SETS + ["run.quiet=false"])).run()
    said = [line for line in cap.get().splitlines() if line.startswith("pruning: ")]  # what the stage is doing, as it starts
    assert [line.split()[1] for line in said[:4]] == ["finding", "task-loss", "the", "searching"], said
    assert "searching for" in said[3] and "then compensating" in said[3]
    assert "refitting the layers" in said[4] and "on 4 training batches" in said[4] and "re-estimating batch-norm" in said[5]
    assert "after refitted layers keep the dense statistics" in said[5]
    assert any("(the search pruned " in line and "candidates)" in line for line in cap.get().splitlines())
    steps = result.report["prune_steps"]
    assert list(steps) == ["split", "dense", "dropped", "compensated", "refitted", "bn"] and steps["split"] == "test"
    assert steps["bn"] == result.report["shrunk"]["accuracy_before_finetune"] == result.report["shrunk"]["accuracy"]
    assert steps["dense"] == result.report["dense"]["accuracy"]
    assert result.report["compensate"] is True and "layers compensated" in result.report["compensation"]
    assert "refitted to the dense model's layer inputs" in result.report["compensation"]
    fine_tuned = Runner(resolve(None, sets=[s for s in SETS if s != "finetune.epochs=0"] + ["finetune.epochs=1"])).run()
    assert "refitted" not in fine_tuned.report["prune_steps"]  # with fine-tuning the refit stays off unless asked for
    off = Runner(resolve(None, sets=SETS + ["prune.compensate=false"])).run()
    assert list(off.report["prune_steps"]) == ["split", "dense", "dropped", "bn"] and off.report["compensation"] is None
    # the same channels either way: compensation changes weights, not the size
    assert off.report["shrunk"]["params"] == result.report["shrunk"]["params"]


def test_bad_input_fails_before_anything_is_written(tmp_path, fashion_dir):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="has no option"):
        Runner(resolve(None, sets=SETS + ["prune.criterion_options={strength: 0.5}", "prune.criterion=l1"]), out).run()
    assert not out.exists()


def test_report_reads_the_typed_state():
    state = RunState.from_dict({"completed": ["build"], "seconds": {"build": 0.25},
                                "metrics": {"dense_size": {"params": 100, "macs": 400}, "cs_init": 2.0}})
    report = build_report(resolve(None), state, None)
    assert set(report) == REPORT_KEYS
    assert report["dense"] == {"params": 100, "macs": 400, "accuracy": None, "note": None} and report["params_ratio"] is None
    assert report["cs"]["init"] == 2.0 and report["stages"] == {"build": 0.25} and report["total_seconds"] == 0.2


# ----------------------------------------------------------- models given to the Python API (issue 24)

def _batches(shape, n=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, *shape, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


API_RECIPE = {"train": {"epochs": 1}, "finetune": {"epochs": 0}, "premin": {"steps": 1}, "prune": {"round_to": None},
              "run": {"quiet": True, "device": "cpu"}}


def _cnn(conv=torch.nn.Conv2d, bn=torch.nn.BatchNorm2d, pool=torch.nn.AdaptiveAvgPool2d):
    return torch.nn.Sequential(conv(1, 8, 3), bn(8), torch.nn.ReLU(), conv(8, 8, 3), torch.nn.ReLU(), pool(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_shrink_refuses_a_torchscript_model_before_any_stage(monkeypatch):
    spy = Spy(monkeypatch)
    data = _batches((1, 12, 12))
    with pytest.raises(ConfigError, match="the model is TorchScript"):
        runner.shrink(torch.jit.script(_cnn()), data, data, target_params=0.6, recipe=API_RECIPE, num_classes=3)
    assert spy.calls == []


def test_a_conv3d_model_shrinks_with_channels_last_on():
    recipe = {**API_RECIPE, "train": {"epochs": 1, "channels_last": True}}
    data = _batches((1, 6, 10, 10))
    result = runner.shrink(_cnn(torch.nn.Conv3d, torch.nn.BatchNorm3d, torch.nn.AdaptiveAvgPool3d), data, data,
                           target_params=0.6, recipe=recipe, num_classes=3)
    assert result.report["params_ratio"] <= 0.6
    assert result.model(data[0][0]).shape == (8, 3)


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_returned_model_keeps_the_memory_format_it_came_in(channels_last):
    model = _cnn()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    recipe = {**API_RECIPE, "train": {"epochs": 1, "channels_last": True}}  # training leaves the model contiguous
    data = _batches((1, 12, 12))
    result = runner.shrink(model, data, data, target_params=0.6, recipe=recipe, num_classes=3)
    kernels = [p for p in result.model.parameters() if p.dim() == 4 and p.shape[1] > 1]  # where the two formats differ
    assert kernels
    assert all(p.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format) for p in kernels)
    assert not any(p.is_contiguous(memory_format=torch.contiguous_format if channels_last else torch.channels_last) for p in kernels)


def test_first_line_quotes_the_recipes_measured_time_only_for_the_recipe_as_written():
    import torch

    from convsim_shrink.pipeline.runner import expected_text
    from convsim_shrink.recipe import resolve
    from convsim_shrink.train import resolve_precision

    fp32 = resolve_precision(torch.device("cpu"), "fp32")
    bf16 = resolve_precision(torch.device("cpu"), "bf16")
    main_job = resolve("resnet18", overrides={"model.name": "resnet18", "prune.target_params": 0.5, "run.quiet": True})
    minutes = main_job.expected_minutes
    assert set(minutes) == {"cpu-fp32", "cpu-bf16"}  # the shipped main recipe carries both measurements
    assert expected_text(main_job, fp32) == f"; expected: about {minutes['cpu-fp32']:g} min (the recipe as written, measured on a 2-core cpu-fp32 machine)"
    assert f"about {minutes['cpu-bf16']:g} min" in expected_text(main_job, bf16)
    assert expected_text(resolve("resnet18", overrides={"train.epochs": 1}), fp32) == ""  # no longer the recipe measured
    assert expected_text(resolve("resnet18", sets=["data.subset=600"]), fp32) == ""
    assert expected_text(resolve(None), fp32) == ""  # built-in defaults: nothing measured
    assert expected_text(resolve({"expected_minutes": {"cpu-fp32": 3}}), fp32) == ""  # a dict is not a recipe file


def test_a_run_past_its_expected_time_says_so():
    from convsim_shrink.pipeline.runner import SLOW_FACTOR, slow_note

    assert slow_note(28 * 60 * SLOW_FACTOR - 1, 28) is None
    assert slow_note(10_000, None) is None  # nothing measured for this recipe on this machine: nothing to compare
    note = slow_note(41.5 * 60, 28)
    assert note.startswith("this run has taken 42 min so far, past the about 28 min expected")


def test_the_slow_run_note_comes_when_the_mark_passes_not_at_a_stage_end():
    import time

    from convsim_shrink.pipeline.runner import SLOW_FACTOR, SlowRunWatch

    said = []
    watch = SlowRunWatch(0.002, said.append).start()  # 0.12 s expected: the note at 0.15 s
    time.sleep(0.002 * 60 * SLOW_FACTOR + 0.5)
    watch.stop()
    assert len(said) == 1 and said[0].startswith("note: this run has taken") and "past the about 0.002 min expected" in said[0]
    quiet = SlowRunWatch(0.002, said.append).start()
    quiet.stop()  # a run that ends before the mark says nothing
    time.sleep(0.002 * 60 * SLOW_FACTOR + 0.3)
    assert len(said) == 1
    SlowRunWatch(None, said.append).start().stop()  # nothing expected, nothing to watch


def test_duration_text_rounds_to_a_readable_unit():
    from convsim_shrink.train.progress import duration_text

    assert [duration_text(s) for s in (12.4, 89, 95, 3000, 5400, 9000)] == ["12 s", "89 s", "2 min", "50 min", "1.5 h", "2.5 h"]


@pytest.mark.parametrize("accuracy, classes, near", [
    (10.3, 10, True), (14.9, 10, True), (15.1, 10, False), (93.0, 10, False),
    (55.0, 2, True), (61.0, 2, False), (0.12, 1000, True), (0.2, 1000, False), (None, 10, False), (50.0, None, False),
])
def test_a_dense_model_near_chance_gets_a_note(accuracy, classes, near):
    from convsim_shrink.pipeline.runner import chance_note

    note = chance_note(accuracy, classes)
    assert (note is not None) == near
    if near:
        assert note.startswith(f"the dense model is near chance ({accuracy:.2f}% top-1 for {classes} classes") and "--epochs" in note
