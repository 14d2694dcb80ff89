"""Every entry point of issue 12 through the command line: torchvision:NAME, timm:NAME, an import string,
--weights FILE, and a checkpoint's round trip (a run's dense.safetensors shrunk again, evaluated and loaded
back without pickle).  Tiny slices of the real Fashion-MNIST; nothing is downloaded."""

import json
import sys
import textwrap
import urllib.error

import pytest
import torch
from torchvision.models._api import WeightsEnum

import convsim_shrink
from convsim_shrink.cli import main
from convsim_shrink.sources.from_timm import TIMM_INSTALL

SMALL = [
    "--quiet", "--finetune-epochs", "1", "--set", "data.subset=64", "--set", "data.test_subset=32", "--set", "premin.steps=2",
    "--set", "train.batch_size=32", "--set", "finetune.batch_size=32", "--set", "prune.bn_recalibration=2",
    "--set", "prune.calibration_batches=1", "--set", "export.formats=[convsim]", "--set", "run.device=cpu",
]


def _main(args) -> int:
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


def _report(run):
    return json.loads((run / "report.json").read_text())


def _state(run):
    return json.loads((run / "state.json").read_text())


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_entry"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def build_net(num_classes=10, in_channels=3):
            return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

        def not_a_model():
            return "hello"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg_entry.nets"
    for name in [m for m in sys.modules if m.startswith("userpkg_entry")]:
        del sys.modules[name]


def test_import_string_from_the_command_line(user_package, tmp_path, fashion_dir):
    out = tmp_path / "run"
    assert _main([f"{user_package}:build_net", "--target-params", "0.5", "--epochs", "1", "--out", str(out), *SMALL]) == 0
    report = _report(out)
    assert report["source"] == f"{user_package}:build_net() with num_classes=10, in_channels=1"
    assert 0.49 <= report["params_ratio"] <= 0.5
    assert [e["layer"] for e in report["ignored_layers"]] == ["8"]  # the output Linear, and nothing else
    model = convsim_shrink.load(out / "model.safetensors")  # rebuilt by importing the function: no pickle
    assert sum(p.numel() for p in model.parameters()) == report["shrunk"]["params"]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.fixture(scope="module")
def tv_run(tmp_path_factory, fashion_dir):
    out = tmp_path_factory.mktemp("tv") / "run"
    assert _main(["torchvision:resnet18", "--target-params", "0.5", "--epochs", "1", "--out", str(out), *SMALL]) == 0
    return out


@pytest.mark.slow
def test_torchvision_model_from_the_command_line(tv_run):
    report = _report(tv_run)
    assert report["source"].startswith("torchvision resnet18, random weights")
    assert 0.49 <= report["params_ratio"] <= 0.5 and report["dense"]["note"] is None
    assert [e["layer"] for e in report["ignored_layers"]] == ["fc"]
    assert len(_state(tv_run)["history_train"]) == 1  # random weights: trained as asked
    model = convsim_shrink.load(tv_run / "model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == report["shrunk"]["params"]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow
def test_checkpoint_round_trip(tv_run, tmp_path, capsys):
    """A run's dense.safetensors shrunk again to a smaller target: its data set is the default, it is not
    trained again, the export evaluates to the reported accuracy and loads back without pickle."""
    out = tmp_path / "again"
    assert _main([str(tv_run / "dense.safetensors"), "--target-params", "0.3", "--out", str(out), *SMALL]) == 0
    report, first = _report(out), _report(tv_run)
    assert report["dataset"] == "fashion-mnist" and report["source"].startswith("checkpoint ")
    assert report["recipe"].startswith("the recipe recorded in ")  # the first run's settings carry over
    assert report["dense"]["params"] == first["dense"]["params"] and 0.29 <= report["params_ratio"] <= 0.3
    assert "dense row is this model evaluated" in report["dense"]["note"]
    assert _state(out)["history_train"] == [] and report["cs"]["after_premin"] == report["cs"]["init"]
    assert report["dense"]["accuracy"] == pytest.approx(first["dense"]["accuracy"], abs=3.2)  # same model, same 32 images
    capsys.readouterr()
    assert _main(["evaluate", str(out / "model.safetensors"), "--subset", "32"]) == 0
    acc = float(capsys.readouterr().out.split("top-1 ")[1].split("%")[0])
    assert acc == pytest.approx(report["shrunk"]["accuracy"], abs=3.2)  # memory format may flip one image in 32
    model = convsim_shrink.load(out / "model.safetensors")
    assert sum(p.numel() for p in model.parameters()) == report["shrunk"]["params"]


@pytest.mark.slow
def test_weights_file_makes_a_pretrained_start_and_epochs_train_it_further(tmp_path, fashion_dir):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)  # a 3-channel model: the stem is adapted
    out = tmp_path / "run"
    assert _main(["torchvision:resnet18", "--weights", str(weights), "--epochs", "1", "--target-params", "0.5",
                  "--out", str(out), *SMALL]) == 0
    report = _report(out)
    assert f"weights from {weights}" in report["source"] and "first conv" in report["source"]
    assert "trained 1 more epoch" in report["dense"]["note"]
    assert len(_state(out)["history_train"]) == 1 and _state(out)["metrics"]["premin_steps"] == 0


@pytest.mark.slow
def test_timm_model_from_the_command_line(tmp_path, fashion_dir):
    pytest.importorskip("timm")
    out = tmp_path / "run"
    assert _main(["timm:test_resnet", "--target-params", "0.5", "--epochs", "1", "--out", str(out), *SMALL]) == 0
    report = _report(out)
    assert report["source"].startswith("timm test_resnet") and 0.48 <= report["params_ratio"] <= 0.5
    model = convsim_shrink.load(out / "model.safetensors")
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("args,expected", [
    (["torchvision:resnet19"], "unknown torchvision model 'resnet19'. Did you mean 'resnet18'?"),
    (["timm:resnet18"], TIMM_INSTALL),
    (["torchvision:resnet18", "--weights", "/nonexistent/w.pt"], "weights file /nonexistent/w.pt does not exist"),
    (["torchvision:resnet18", "--weights", "BAD"], "could not be read with torch.load(weights_only=True)"),
    (["torchvision:resnet18", "--weights", "DEFAULT"], "could not download"),
    (["torchvision:resnet18", "--weights", "IMAGENET9K"], "unknown weights of resnet18 'IMAGENET9K'"),
    (["nopkg_entry.models:build"], "cannot import 'nopkg_entry.models'"),
    (["PKG:not_a_model"], "returned a str, not a torch.nn.Module"),
    (["PKG:build_nett"], "Did you mean 'build_net'"),
    (["/nonexistent/dense.safetensors"], "/nonexistent/dense.safetensors does not exist"),
])
def test_source_errors_are_one_line_exit_2_nothing_written(args, expected, user_package, tmp_path, monkeypatch, capsys, fashion_dir):
    def offline(self, *a, **k):  # no test downloads: a DEFAULT weights request fails as it does offline
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    args = [a.replace("PKG", user_package).replace("BAD", str(bad)) for a in args]
    out = tmp_path / "out"
    assert _main(args + ["--out", str(out), "--set", "data.subset=64", "--set", "data.test_subset=32"]) == 2
    err = capsys.readouterr().err
    assert expected in " ".join(err.split()), err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 4
    assert not out.exists() and not (tmp_path / "runs").exists()
