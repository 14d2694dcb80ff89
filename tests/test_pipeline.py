"""End to end on a small slice of the real Fashion-MNIST (marked slow: tens of seconds each)."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import convsim_shrink
from convsim_shrink.cli import main
from convsim_shrink.data import build_data
from convsim_shrink.recipe import DataConfig
from convsim_shrink.train import evaluate, resolve_precision

pytestmark = pytest.mark.slow

SMALL = [
    "--epochs", "5", "--finetune-epochs", "2", "--quiet",
    "--set", "data.subset=800", "--set", "data.test_subset=500", "--set", "premin.steps=20",
    "--set", "export.formats=[convsim, onnx, torchscript]", "--set", "model.width=0.5", "--set", "prune.round_to=null",
]


def _main(args):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fashion_dir):
    out = tmp_path_factory.mktemp("e2e") / "run"
    assert _main(["simple_cnn", "--target-params", "0.5", "--out", str(out), *SMALL]) == 0
    return out


def test_report_has_every_field(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    assert report["model"] == "simple_cnn" and report["dataset"] == "fashion-mnist"
    for part in ("dense", "shrunk"):
        assert {"params", "macs", "accuracy"} <= set(report[part])
        assert report[part]["params"] > 0 and report[part]["macs"] > 0 and 0 <= report[part]["accuracy"] <= 100
    assert 0.49 <= report["params_ratio"] <= 0.50
    assert report["params_ratio"] == pytest.approx(report["shrunk"]["params"] / report["dense"]["params"])
    assert 0 < report["macs_ratio"] < 1
    assert report["cs"]["after_premin"] < report["cs"]["init"] and report["cs"]["after_train"] > 0
    assert set(report["stages"]) == {"build", "premin", "train", "prune", "finetune", "export"}
    assert set(report["exports"]) == {"convsim", "onnx", "torchscript"}
    assert all(Path(p).is_file() for p in report["exports"].values())
    assert report["onnx_max_abs_diff"] <= 1e-4
    assert report["shrunk"]["accuracy"] > 35  # it learned something (chance is 10%)
    for f in ("recipe.yaml", "report.md", "training_curves.png", "channels_per_layer.png", "cs_per_layer.png"):
        assert (finished_run / f).is_file(), f
    assert not list(finished_run.glob(".*.tmp"))
    # the defaults that issue 6's comparison chose, stated in the report
    assert report["criterion"] == "convsim-taylor" and report["global_pruning"] is True and report["distill"] == 0.5
    assert "(global pruning), target 0.5 of the params" in (finished_run / "report.md").read_text()


def test_exported_model_reproduces_the_reported_accuracy(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    model = convsim_shrink.load(report["exports"]["convsim"])
    assert sum(p.numel() for p in model.parameters()) == report["shrunk"]["params"]
    data = build_data(DataConfig(test_subset=500), batch_size=128)
    acc = evaluate(model, data.test, resolve_precision(torch.device("cpu"), "fp32", False))["acc"]
    assert acc == pytest.approx(report["shrunk"]["accuracy"], abs=0.21)  # memory format may flip one image in 500


def test_saved_recipe_repeats_the_run(finished_run):
    again = convsim_shrink.recipe.resolve(finished_run / "recipe.yaml")
    assert again.model.name == "simple_cnn" and again.data.subset == 800 and again.finetune.epochs == 2


def test_interrupted_run_resumes_without_redoing_finished_stages(tmp_path, monkeypatch, fashion_dir):
    import convsim_shrink.pipeline.stages as stages

    out = tmp_path / "run"
    real_fit = stages.fit

    def crash_in_finetune(*args, **kw):
        if kw.get("stage") == "finetune":
            raise KeyboardInterrupt
        return real_fit(*args, **kw)

    monkeypatch.setattr(stages, "fit", crash_in_finetune)
    assert _main(["simple_cnn", "--out", str(out), *SMALL]) == 130
    state = json.loads((out / "state.json").read_text())
    assert state["completed"] == ["build", "premin", "train", "prune"]
    trained = (out / "dense.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(stages, "fit", real_fit)
    assert _main(["--resume", str(out), "--quiet"]) == 0
    assert (out / "dense.safetensors").stat().st_mtime_ns == trained  # training was not repeated
    report = json.loads((out / "report.json").read_text())
    assert report["shrunk"]["accuracy"] is not None and 0.49 <= report["params_ratio"] <= 0.5


def test_python_api_shrinks_any_module(fashion_dir):
    data = build_data(DataConfig(subset=600, test_subset=300), batch_size=64)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    result = convsim_shrink.shrink(
        model, data.train, data.test, target_params=0.5,
        recipe={"premin": {"steps": 10}, "train": {"epochs": 1}, "finetune": {"epochs": 1}, "run": {"quiet": True}},
    )
    shrunk = result.model
    assert sum(p.numel() for p in shrunk.parameters()) <= 0.5 * sum(p.numel() for p in model.parameters())
    assert shrunk(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert result.report["shrunk"]["accuracy"] is not None and result.report["params_ratio"] <= 0.5


def test_cli_evaluate_export_inspect_on_the_exported_model(finished_run, capsys, tmp_path):
    report = json.loads((finished_run / "report.json").read_text())
    model_file = report["exports"]["convsim"]
    assert _main(["evaluate", model_file, "--subset", "500"]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("top-1 ")[1].split("%")[0])
    assert acc == pytest.approx(report["shrunk"]["accuracy"], abs=0.21)
    assert _main(["export", model_file, "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").is_file() and "max abs difference" in capsys.readouterr().out
    assert _main(["inspect", model_file, "--images", "32"]) == 0
    err = capsys.readouterr().err
    assert "features.0" in err and f"{report['shrunk']['params']:,} parameters" in err
