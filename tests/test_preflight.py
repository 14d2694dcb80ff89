"""Preflight: every check fails before any work, with one line naming the problem and the fix."""

import re
import sys

import pytest
import torch

from convsim_shrink.cli import main
from convsim_shrink.errors import (
    ConfigError,
    MissingDependencyError,
    OutputNotWritableError,
)
from convsim_shrink.export.onnx import newest_opset
from convsim_shrink.pipeline import preflight
from convsim_shrink.recipe import resolve


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def no_onnxruntime(monkeypatch):
    """As if onnxruntime were not installed (None in sys.modules makes every import of it fail)."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


# ------------------------------------------------------------------------------------ device


def test_a_device_that_is_not_there_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        preflight.check_run(resolve(None, sets=["run.device=cuda"]), None)
    assert "no CUDA GPU is visible; use --device cpu or auto" in _one_line(err)
    assert preflight.check_device("cpu") == torch.device("cpu")


def test_a_precision_the_device_cannot_run_is_refused_for_either_stage():
    for section in ("train", "finetune"):
        recipe = resolve(None, sets=["run.device=cpu", f"{section}.precision=fp16"])
        with pytest.raises(ConfigError, match=rf"^{section}\.precision=fp16: fp16 autocast is not supported on the CPU"):
            preflight.check_run(recipe, None)
    preflight.check_run(resolve(None, sets=["run.device=cpu", "finetune.precision=bf16"]), None)


# ---------------------------------------------------------------------------------- packages


def test_a_missing_package_names_the_install_command(no_onnxruntime):
    with pytest.raises(MissingDependencyError) as err:
        preflight.require_packages(["json", "onnxruntime"], "the thing")
    assert _one_line(err) == "the thing needs onnxruntime, which is not installed; install it with `pip install onnxruntime`"
    assert isinstance(err.value, ImportError)  # callers that catch ImportError still do


def test_an_installed_package_that_does_not_import_is_named_with_the_reason(tmp_path, monkeypatch):
    (tmp_path / "convsim_fake_native.py").write_text("raise OSError('libfake.so: cannot open shared object file')\n")
    (tmp_path / "convsim_fake_needy.py").write_text("import convsim_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependencyError) as err:
        preflight.require_packages(["convsim_fake_native"], "x")
    assert "installed but does not import (libfake.so: cannot open shared object file)" in _one_line(err)
    with pytest.raises(MissingDependencyError, match="convsim_fake_needy, which is installed but does not import .*convsim_no_such_dependency"):
        preflight.require_packages(["convsim_fake_needy"], "x")


@pytest.mark.parametrize("missing,expected", [
    (("onnxruntime",), "export format 'onnx' needs onnxruntime, which is not installed; install it with `pip install onnxruntime`"),
    (("onnx", "onnxruntime"), "export format 'onnx' needs onnx and onnxruntime, which are not installed; install them with "
                              "`pip install onnx onnxruntime`"),
])
def test_onnx_export_needs_onnx_and_onnxruntime(monkeypatch, missing, expected):
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError) as err:
        preflight.check_exports(["convsim", "onnx"])
    assert _one_line(err) == expected + ", or drop it: --set 'export.formats=[convsim]'"
    preflight.check_exports(["convsim", "torchscript"])  # the other formats need neither


def test_onnx_export_is_tried_in_memory_at_the_recipes_opset():
    preflight.check_exports(["onnx"], opset=17)  # a tiny model through torch.onnx and onnxruntime
    newest = newest_opset()
    if newest is not None:
        with pytest.raises(ConfigError, match=rf"export.opset={newest + 1} is newer than this torch writes \(up to {newest}\)"):
            preflight.check_exports(["onnx"], opset=newest + 1)


def test_a_failing_trial_export_is_one_line(monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter exploded\nwith a long second line")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(MissingDependencyError) as err:
        preflight.check_exports(["onnx"], opset=17)
    assert "ONNX export does not work here at opset 17 (RuntimeError: exporter exploded)" in _one_line(err)


# ------------------------------------------------------------------------------------ output


def test_a_new_run_directory_is_checked_without_leaving_anything(tmp_path):
    preflight.check_output_dir(tmp_path / "a" / "b" / "run")
    assert list(tmp_path.iterdir()) == []  # neither the run directory nor the trial entry


def test_a_run_directory_in_use_is_refused_unless_resumed(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty; choose another --out or --resume it"):
        preflight.check_output_dir(tmp_path)
    preflight.check_output_dir(tmp_path, resume=True)
    preflight.check_output_dir(tmp_path / "empty_is_fine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_a_file_in_the_way_is_refused(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(OutputNotWritableError, match="is a file, not a folder"):
        preflight.check_output_dir(blocker)
    with pytest.raises(OutputNotWritableError, match=re.escape(f"cannot create {blocker / 'run'}: {blocker} is a file")):
        preflight.check_output_dir(blocker / "run")


def test_a_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    # permissions cannot be taken away from root, so the filesystem's refusal is simulated
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(preflight.tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputNotWritableError) as err:
        preflight.check_output_dir(tmp_path / "run")
    assert _one_line(err) == f"cannot write {tmp_path / 'run'}: {tmp_path} is not writable (Permission denied); choose another --out"
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------- where it is called


def test_run_without_a_directory_skips_the_checks_of_what_it_would_write(no_onnxruntime, tmp_path):
    recipe = resolve(None, sets=["run.device=cpu"])  # exports onnx, whose checker (onnxruntime) is missing here
    preflight.check_run(recipe, None)  # the Python API without run_dir exports nothing: no complaint
    with pytest.raises(MissingDependencyError, match="onnxruntime"):  # with a run directory the same recipe is refused
        preflight.check_run(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_pipeline_checks_before_reading_data_or_writing(tmp_path, monkeypatch, no_onnxruntime):
    import convsim_shrink.pipeline.runner as runner

    def must_not_run(*args, **kwargs):
        raise AssertionError("the data was read before the preflight checks")

    monkeypatch.setattr(runner, "prepare_data", must_not_run)
    run = runner.Runner(resolve("simple_cnn", sets=["run.device=cpu"]), tmp_path / "run")
    with pytest.raises(MissingDependencyError, match="pip install onnxruntime"):
        run.prepare()
    assert list(tmp_path.iterdir()) == []


def test_cli_missing_export_package_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, no_onnxruntime):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["simple_cnn", "--set", "data.subset=100", "--device", "cpu"])  # default run directory: runs/...
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "export format 'onnx' needs onnxruntime, which is not installed; install it with `pip install onnxruntime`" in err
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, no run directory


def test_cli_export_command_checks_its_packages_first(tmp_path, capsys, no_onnxruntime):
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "m.safetensors"), "--format", "onnx"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pip install onnxruntime" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------- models it cannot hook or trace (issue 24)

def _plain(in_channels=1):
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 3))


def _inner_scripted():
    model = _plain()
    model[0] = torch.jit.script(model[0])
    return model


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("make,expected", [
    (lambda: torch.jit.script(_plain()), "the model is TorchScript (torch.jit.script or torch.jit.trace)"),
    (lambda: torch.jit.trace(_plain(), torch.zeros(1, 1, 8, 8)), "the model is TorchScript"),
    (_inner_scripted, "the model's layer '0' is TorchScript"),
    (lambda: torch.nn.Sequential(torch.nn.Flatten()), "the model has no parameters"),
    (lambda: _plain(in_channels=3), "the model does not run on the data's inputs of shape 1x1x8x8 (RuntimeError: "),
], ids=["script", "trace", "scripted-layer", "no-parameters", "wrong-channels"])
def test_a_model_the_tool_cannot_hook_or_trace_is_refused_in_one_line(make, expected):
    with pytest.raises(ConfigError) as err:
        preflight.check_model(make(), torch.zeros(1, 1, 8, 8))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_models_it_can_work_with_pass_and_are_left_as_they_were():
    half = _plain().half()
    preflight.check_model(half, torch.zeros(1, 1, 8, 8))  # run on a float copy
    assert next(half.parameters()).dtype == torch.float16 and half.training
    conv3d = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    preflight.check_model(conv3d, torch.zeros(1, 1, 5, 8, 8))


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_cli_refuses_a_torchscript_model_before_training_and_writes_nothing(tmp_path, monkeypatch, capsys, fashion_dir):
    (tmp_path / "scripted_models.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def make(num_classes=10, in_channels=1):\n"
        "    return torch.jit.script(nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), "
        "nn.Flatten(), nn.Linear(4, num_classes)))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["scripted_models:make", "--data-dir", str(fashion_dir.parent), "--set", "data.subset=64", "--device", "cpu",
              "--set", "export.formats=[convsim]", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "the model is TorchScript" in err
    assert not (tmp_path / "run").exists()
