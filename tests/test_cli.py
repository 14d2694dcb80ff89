"""The command line hands the right settings to the library, and turns user mistakes into one line."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import convsim_shrink
from convsim_shrink.cli import app, main

runner = CliRunner()


def run_main(args) -> int:
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


class _FakeRunner:
    calls: list = []

    def __init__(self, recipe, run_dir, **kw):
        self.recipe, self.run_dir, self.kw = recipe, Path(run_dir), kw
        _FakeRunner.calls.append(self)

    def run(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "report.json").write_text(json.dumps({
            "model": self.recipe.model.name, "dataset": "x", "criterion": "c", "dense": {"params": 1, "macs": 1, "accuracy": 1.0},
            "shrunk": {"params": 1, "macs": 1, "accuracy": 1.0, "accuracy_before_finetune": 1.0}, "params_ratio": 0.5,
            "macs_ratio": 0.5, "accuracy_delta": 0.0, "cs": {}, "total_seconds": 1, "exports": {}}))
        return type("R", (), {"run_dir": self.run_dir})()


@pytest.fixture
def fake(monkeypatch):
    import convsim_shrink.pipeline.runner as runner

    _FakeRunner.calls = []
    monkeypatch.setattr(runner, "Runner", _FakeRunner)
    return _FakeRunner.calls


def test_model_shorthand_uses_model_recipe_and_options(fake, tmp_path):
    assert 0 == run_main(["resnet18", "--target-params", "0.4", "--epochs", "2", "--finetune-epochs", "1", "--criterion", "l1",
          "--seed", "3", "--out", str(tmp_path / "r"), "--set", "train.lr=0.05", "--quiet", "--device", "cpu"])
    r = fake[0].recipe
    assert r.model.name == "resnet18" and r.prune.target_params == 0.4 and r.train.epochs == 2
    assert r.finetune.epochs == 1 and r.prune.criterion == "l1" and r.run.seed == 3 and r.train.lr == 0.05
    assert r.run.quiet and r.run.device == "cpu" and fake[0].run_dir == tmp_path / "r"
    shipped = convsim_shrink.recipe.resolve("resnet18")
    assert r.model.width == shipped.model.width  # the model's own recipe underlies the options


def test_target_macs_replaces_recipe_params_target(fake, tmp_path):
    assert 0 == run_main(["resnet18", "--target-macs", "0.3", "--out", str(tmp_path / "r")])
    assert fake[0].recipe.prune.target_macs == 0.3 and fake[0].recipe.prune.target_params is None


def test_run_subcommand_takes_a_recipe_file(fake, tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("model: {name: vgg11_bn, width: 0.25}\ndata: {subset: 100}\n")
    result = runner.invoke(app, ["run", str(f), "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    r = fake[0].recipe
    assert r.model.name == "vgg11_bn" and r.data.subset == 100 and r.data.dir == str(tmp_path)


def test_resume_reads_the_saved_recipe(fake, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(convsim_shrink.recipe.resolve("simple_cnn", sets=["train.epochs=5"]).to_yaml())
    assert 0 == run_main(["--resume", str(run)])
    assert fake[0].kw["resume"] is True and fake[0].recipe.train.epochs == 5


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and convsim_shrink.__version__ in capsys.readouterr().out
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "shrink" in result.output and "inspect" in result.output
    assert "--resume" in result.output  # how to continue a crashed run is on the first screen a user sees


@pytest.mark.parametrize("args", [["--help"], ["shrink", "--help"], ["sweep", "--help"]])
def test_help_shows_no_type_for_a_flag(args):
    """Typer prints ``<bool>`` beside a flag as if it took a value; flags show none, options keep theirs."""
    result = runner.invoke(app, args, env={"COLUMNS": "120"})
    assert result.exit_code == 0 and "--help" in result.output
    assert "<bool>" not in result.output
    if args[0] == "shrink":
        assert "<path>" in result.output and "--quiet" in result.output  # --resume PATH keeps its type
    if args[0] in ("shrink", "sweep"):  # a list option shows what one value looks like, not Python's type
        assert "<list[str]>" not in result.output and "<key=value>" in result.output


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_load_neither_torch_nor_torch_pruning(flag):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from convsim_shrink.cli import main\n"
        "try:\n"
        f"    main([{flag!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('loaded:', sorted(m for m in ('torch', 'torch_pruning', 'torchvision') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "loaded: []" in res.stdout


def test_list_criteria_shows_needs_and_options():
    out = runner.invoke(app, ["list", "criteria"]).output
    line = next(x for x in out.splitlines() if x.startswith("convsim "))
    assert "[global]" in line and "options: strength=1.0, magnitude=True" in line
    assert "[gradients, global]" in next(x for x in out.splitlines() if x.startswith("convsim-taylor"))


def test_export_of_a_file_without_input_shape_says_how(tmp_path, capsys):
    from convsim_shrink.export.native import save
    from convsim_shrink.models import create_model

    old = save(create_model("simple_cnn", in_channels=1, width=0.25), tmp_path / "old.safetensors")
    assert run_main(["export", str(old), "--format", "torchscript"]) == 2
    assert "--input-shape C,H,W" in " ".join(capsys.readouterr().err.split())
    assert run_main(["export", str(old), "--format", "torchscript", "--input-shape", "1,28,28"]) == 0
    assert old.with_suffix(".ts").is_file()


def test_list_commands():
    assert "resnet18" in runner.invoke(app, ["list", "models"]).output
    assert "taylor" in runner.invoke(app, ["list", "criteria"]).output
    assert "cifar100" in runner.invoke(app, ["list", "datasets"]).output
    assert "prune.target_params" in runner.invoke(app, ["list", "keys"]).output
    assert "resnet18-cifar10" in runner.invoke(app, ["list", "recipes"]).output


def test_list_recipes_shows_whole_descriptions(monkeypatch):
    """A description that spans lines in the YAML is shown whole (it was cut at its first line break)."""
    from convsim_shrink import recipe

    monkeypatch.setattr(recipe, "list_recipes", lambda: ["two-lines"])
    monkeypatch.setattr(recipe, "read_recipe_file", lambda name: {"description": "sized for a 2-core\nCPU: about ten minutes"})
    monkeypatch.setenv("COLUMNS", "200")
    out = runner.invoke(app, ["list", "recipes"]).output
    assert "sized for a 2-core CPU: about ten minutes" in " ".join(out.split())


@pytest.mark.parametrize("args,expected", [
    (["resnet19"], "unknown model 'resnet19'. Did you mean 'resnet18'? Known: "),
    (["resnet18", "--target-params", "1.5"], "--target-params 1.5 is out of range"),
    (["resnet18", "--target-macs", "0"], "--target-macs 0.0 is out of range"),
    (["resnet18", "--set", "train.lrr=0.1"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    (["resnet18", "--set", "train.epochs=many"], "train.epochs = 'many' is invalid"),
    (["resnet18", "--criterion", "l3"], "unknown criterion 'l3'"),
    (["resnet18", "--recipe", "nope.yaml"], "recipe file 'nope.yaml' does not exist"),
    (["simple_cnn", "--data", "cifar10", "--data-dir", "/nonexistent"], "cifar10 not found (looked in /nonexistent"),
    (["evaluate", "/nonexistent/model.safetensors"], "does not exist"),
    (["--resume", "/nonexistent/run"], "is not a run directory"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "out"
    extra = ["--out", str(out_dir)] if args[0] not in ("evaluate", "--resume") else []
    with pytest.raises(SystemExit) as e:
        main(args + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert expected in " ".join(err.split())
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert not out_dir.exists() and not (tmp_path / "runs").exists()


def test_unreadable_checkpoint(capsys, tmp_path):
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "corrupt" in err and "Traceback" not in err


def test_existing_run_dir_is_not_overwritten(capsys, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["simple_cnn", "--out", str(out), "--set", "data.subset=100"])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_module_entry_point():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "convsim_shrink", "list", "models"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "mobilenet_v2" in res.stdout


def test_sigterm_stops_a_run_like_ctrl_c_and_gives_the_terminal_its_cursor_back(tmp_path):
    # on a terminal the progress bar hides the cursor; Python's default SIGTERM ended the process without
    # showing it again, and without the message that says how to resume
    import os
    import pty
    import select
    import signal
    import subprocess
    import sys
    import time

    primary, secondary = pty.openpty()
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100")
    proc = subprocess.Popen([sys.executable, "-m", "convsim_shrink", "simple_cnn", "--out", str(out), "--epochs", "50",
                             "--set", "data.subset=2000", "--set", "premin.steps=0"],
                            stdin=secondary, stdout=secondary, stderr=secondary, env=env, close_fds=True)
    os.close(secondary)
    seen, hidden_at, deadline = b"", None, time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            if hidden_at is None and b"\x1b[?25l" in seen:
                hidden_at = len(seen)
                time.sleep(1.0)
                proc.send_signal(signal.SIGTERM)
            if proc.poll() is not None and not ready:
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(primary)
    assert hidden_at is not None, seen[-2000:]
    assert proc.returncode == 130, seen[-2000:]
    tail = seen[hidden_at:]
    assert tail.rfind(b"\x1b[?25h") > tail.rfind(b"\x1b[?25l"), seen[-2000:]
    assert b"--resume" in tail and b"Traceback" not in seen
