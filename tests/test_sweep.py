"""The sweep command (convsim_shrink/sweep.py) and the --max-drop size search (convsim_shrink/sizesearch.py).

Fast: a tiny model, a small slice of real Fashion-MNIST, at most one epoch anywhere; the search's
logic is checked exactly on fake accuracy curves.
"""

import csv
import json

import pytest
import torch

from convsim_shrink.cli import main
from convsim_shrink.errors import ConfigError, TargetUnreachableError
from convsim_shrink.export.load import load
from convsim_shrink.pipeline import stages
from convsim_shrink.pipeline.sizesearch import (
    Candidate,
    SearchSettings,
    bisect_size,
    search_size,
    with_validation,
)
from convsim_shrink.pipeline.sweep import (
    SweepState,
    parse_max_drop,
    parse_targets,
    run_sweep,
)
from convsim_shrink.recipe import resolve

SETS = [
    "model.name=simple_cnn", "model.width=0.25", "data.subset=200", "data.test_subset=100", "premin.steps=0",
    "train.epochs=0", "finetune.epochs=1", "prune.bn_recalibration=2", "prune.round_to=null", "prune.compensation_batches=2",
    "export.formats=[convsim]", "run.quiet=true", "run.device=cpu", "prune.latency_batch=8", "prune.step_accuracy=false",
]


# ------------------------------------------------------------------------------------------ input


def test_targets_parse_in_the_order_given():
    assert parse_targets("0.75, 0.5,0.25,0.1") == [0.75, 0.5, 0.25, 0.1]


@pytest.mark.parametrize("text,expected", [
    ("", "is empty"), (" , ", "is empty"), ("0.5,1.5", "1.5 is out of range"), ("0", "0 is out of range"), ("1", "1 is out of range"),
    ("-0.2", "-0.2 is out of range"), ("0.5,0.5", "0.5 is given twice"), ("0.5,.50", "is given twice"), ("0.5,abc", "'abc' is not a number"),
    ("nan", "nan is out of range"),
])
def test_bad_targets_are_one_error_each(text, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_targets(text)


@pytest.mark.parametrize("text,ok", [("0.5", 0.5), ("0", 0.0), ("-0.1", None), ("abc", None), ("inf", None)])
def test_max_drop_parses_points_at_least_zero(text, ok):
    if ok is None:
        with pytest.raises(ConfigError, match="--max-drop"):
            parse_max_drop(text)
    else:
        assert parse_max_drop(text) == ok


@pytest.mark.parametrize("args,expected", [
    (["sweep", "simple_cnn", "--targets", "0.5,1.5"], "1.5 is out of range"),
    (["sweep", "simple_cnn", "--targets", "0.5,0.25,0.5"], "0.5 is given twice"),
    (["sweep", "simple_cnn", "--targets", ""], "--targets is empty"),
    (["sweep", "simple_cnn", "--targets", "0.5,x"], "'x' is not a number"),
    (["sweep", "simple_cnn"], "give the sizes to sweep"),
    (["sweep", "simple_cnn", "--targets", "0.5", "--target-kind", "flops"], "unknown --target-kind 'flops'"),
    (["sweep", "simple_cnn", "--targets", "0.5", "--nproc", "2"], None),  # placeholder replaced below
    (["simple_cnn", "--max-drop", "-1"], "--max-drop -1 is out of range"),
    (["simple_cnn", "--max-drop", "half"], "--max-drop 'half' is not a number"),
    (["simple_cnn", "--max-drop", "0.5", "--target-params", "0.5"], "--max-drop searches for the size itself"),
    (["simple_cnn", "--max-drop", "0.5", "--target-latency", "0.5"], "--max-drop searches for the size itself"),
    (["run", "simple_cnn", "--max-drop", "0.5", "--target-macs", "0.5"], "--max-drop searches for the size itself"),
    (["simple_cnn", "--set", "prune.max_accuracy_drop=-2"], "prune.max_accuracy_drop = -2 is invalid"),
    (["sweep", "--resume", "/nonexistent/sweep"], "is not a run directory"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(args, expected, capsys, tmp_path, monkeypatch):
    if expected is None:
        args, expected = ["sweep", "simple_cnn", "--targets", "0.5,2", "--nproc", "2"], "2 is out of range"  # checked before torchrun starts
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "out"
    extra = [] if "--resume" in args else ["--out", str(out_dir)]
    with pytest.raises(SystemExit) as e:
        main(args + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert expected in " ".join(err.split())
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert not out_dir.exists() and not (tmp_path / "runs").exists()


def test_max_drop_reaches_the_recipe(monkeypatch, tmp_path):
    from convsim_shrink.pipeline import runner

    seen = {}

    class Fake:
        def __init__(self, recipe, run_dir, **kw):
            seen["recipe"] = recipe
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "Runner", Fake)
    with pytest.raises(SystemExit) as e:
        main(["resnet18", "--max-drop", "0.5", "--out", str(tmp_path / "r")])
    assert e.value.code == 130
    r = seen["recipe"]
    assert r.prune.max_accuracy_drop == 0.5 and r.prune.search_kind == "params"


# ------------------------------------------------------------------------------------------ reuse


@pytest.fixture(scope="module")
def tiny(fashion_dir):
    torch.manual_seed(0)
    recipe = resolve(None, sets=SETS)
    data = stages.prepare_data(recipe)
    x = stages.example_inputs_for(data.info)
    model = stages.build_stage(recipe.model, data.info, seed=0, example_inputs=x).model
    stages.train_stage(model, data, recipe.train.model_copy(update={"epochs": 1}))
    return recipe, data, x, model


def test_prune_stage_reuse_gives_the_same_models_and_calibrates_once(tiny):
    recipe, data, x, dense = tiny
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    reuse = stages.PruneReuse()
    for target in (0.6, 0.3):
        cfg = recipe.prune.model_copy(update={"target_params": target})
        fresh = stages.prune_stage(dense, data, cfg, example_inputs=x)
        reused = stages.prune_stage(dense, data, cfg, example_inputs=x, reuse=reuse)
        a, b = fresh.model.state_dict(), reused.model.state_dict()
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
        assert fresh.accuracy == pytest.approx(reused.accuracy)
    assert reuse.calibrations == 1
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # the dense model is left as it was


def test_prune_stage_reuse_measures_the_dense_latency_once(tiny):
    recipe, data, x, dense = tiny
    reuse = stages.PruneReuse()
    calls = []
    from convsim_shrink.measure import latency

    real = latency.latency_meter

    def meter(*a, **kw):
        inner = real(*a, **kw)

        def timed(model):
            calls.append(sum(p.numel() for p in model.parameters()))
            return inner(model)

        return timed

    dense_params = sum(p.numel() for p in dense.parameters())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency, "latency_meter", meter)
        for target in (0.9, 0.8):
            cfg = recipe.prune.model_copy(update={"target_params": None, "target_latency": target, "latency_batch": 8,
                                                  "latency_tolerance": 0.3})
            try:
                stages.prune_stage(dense, data, cfg, example_inputs=x, reuse=reuse)
            except TargetUnreachableError:
                pass  # timings of a tiny model are noise: only the count of dense measurements matters here
    assert reuse.latency_measurements == 3 and reuse.base_latency > 0
    # the search itself times the model as it is once per call; the dense base is never re-measured
    assert calls.count(dense_params) == 3 + 2


# ------------------------------------------------------------------------------------------ sweep


def test_tiny_sweep_writes_table_plot_and_models(tmp_path, fashion_dir):
    from matplotlib.image import imread

    out = tmp_path / "sweep"
    targets = [0.7, 0.4, 0.2]
    state = run_sweep(resolve(None, sets=SETS), out, targets=targets, kind="params")
    assert state.finished and [p.target for p in state.points] == targets
    assert state.calibrations == 1  # one calibration of the dense model for every point
    # the plot: three panels side by side, read back from the file
    img = imread(out / "sweep.png")
    h, w = img.shape[:2]
    assert 300 <= h <= 800 and 1000 <= w <= 2000 and w > 2 * h
    assert img[..., :3].std() > 0.05  # not a blank image
    # the table's rows are the dense model and the targets, in order
    md = (out / "sweep.md").read_text().splitlines()
    rows = [line.split("|")[1].strip() for line in md if line.startswith("| ") and not line.startswith("| params target")]
    assert rows == ["dense", "0.7", "0.4", "0.2"]
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["target"] for r in table] == ["dense", "0.7", "0.4", "0.2"]
    saved = json.loads((out / "sweep.json").read_text())
    assert [p["target"] for p in saved["points"]] == targets
    dense_params = saved["dense"]["params"]
    for p, t in zip(state.points, targets):
        assert t - 0.01 - 1e-9 <= p.params_ratio <= t  # the measured target, within its tolerance
        assert p.params == round(p.params_ratio * dense_params)
        assert p.latency_b1_ms > 0 and p.latency_batch_ms > 0 and 0 <= p.top1 <= 100 and p.seconds > 0
        model = load(out / p.model)
        assert sum(q.numel() for q in model.parameters()) == p.params
    assert (out / "dense.safetensors").is_file() and state.dense["latency_b1_ms"] > 0


@pytest.mark.slow
def test_sweep_resumes_at_the_first_unfinished_point(tmp_path, monkeypatch, fashion_dir):
    out = tmp_path / "sweep"
    calls = {"prune": [], "train": 0, "finetune": 0}
    real_prune, real_ft, real_train = stages.prune_stage, stages.finetune_stage, stages.train_stage
    from convsim_shrink.pipeline import runner

    def prune(dense, data, cfg, **kw):
        calls["prune"].append(cfg.target_params)
        return real_prune(dense, data, cfg, **kw)

    def finetune(*a, **kw):
        calls["finetune"] += 1
        if calls["finetune"] == 2:
            raise KeyboardInterrupt  # stopped during the second point
        return real_ft(*a, **kw)

    def train(*a, **kw):
        calls["train"] += 1
        return real_train(*a, **kw)

    monkeypatch.setattr(stages, "prune_stage", prune)
    monkeypatch.setattr(stages, "finetune_stage", finetune)
    monkeypatch.setattr(runner, "train_stage", train)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(resolve(None, sets=SETS), out, targets=[0.6, 0.4, 0.2])
    first = SweepState.load(out / "sweep.json")
    assert [p.target for p in first.points] == [0.6] and not first.finished
    stamp = (out / "points" / "params-0.6" / "model.safetensors").stat().st_mtime_ns
    calls["prune"].clear()
    state = run_sweep(resolve(None, sets=SETS), out, resume=True)
    assert calls["prune"] == [0.4, 0.2] and calls["train"] == 1  # the dense model is not trained again
    assert [p.target for p in state.points] == [0.6, 0.4, 0.2] and state.finished
    assert (out / "points" / "params-0.6" / "model.safetensors").stat().st_mtime_ns == stamp
    assert state.dense == first.dense  # the dense latency is measured once, also across a resume


@pytest.mark.slow
def test_sweep_over_macs_and_an_unreachable_point(tmp_path, monkeypatch, fashion_dir):
    real = stages.prune_stage

    def prune(dense, data, cfg, **kw):
        if cfg.target_macs == 0.1:
            raise TargetUnreachableError("the smallest allowed model keeps 0.2 of the MACs")
        return real(dense, data, cfg, **kw)

    monkeypatch.setattr(stages, "prune_stage", prune)
    state = run_sweep(resolve(None, sets=SETS + ["finetune.epochs=0"]), tmp_path / "s", targets=[0.5, 0.1], kind="macs")
    good, bad = state.points
    assert good.macs_ratio <= 0.5 and good.model is not None
    assert bad.model is None and "0.2 of the MACs" in bad.note
    assert "0.2 of the MACs" in (tmp_path / "s" / "sweep.md").read_text()


# ------------------------------------------------------------------------------------------ size search


def _reference_bisection(passes, lo, hi, resolution, limit):
    seq = []
    while hi - lo > resolution and len(seq) < limit:
        t = round((lo + hi) / 2, 4)
        seq.append(t)
        if passes(t):
            hi = t
        else:
            lo = t
    return (hi if hi < 1 else None), seq


@pytest.mark.parametrize("threshold", [0.13, 0.5, 0.77, 0.97])
def test_bisection_on_a_monotone_curve_finds_the_smallest_passing_size(threshold):
    dense, drop = 90.0, 0.5
    slope = drop / (1 - threshold)  # top-1 falls linearly; exactly `drop` below dense at `threshold`

    def evaluate(t):
        top1 = dense - slope * (1 - t)
        return Candidate(t, dense - top1 <= drop + 1e-12, val_top1=top1)

    settings = SearchSettings(drop, resolution=0.02, floor=0.02)
    size, tried = bisect_size(evaluate, settings)
    assert size is not None and size >= threshold - 1e-9 and size - threshold <= 0.02
    assert all(c.passed == (c.target >= threshold - 1e-9) for c in tried)
    ref_size, seq = _reference_bisection(lambda t: t >= threshold - 1e-9, 0.02, 1.0, 0.02, 8)
    assert [c.target for c in tried] == seq and size == ref_size


def test_bisection_when_nothing_or_everything_passes():
    size, tried = bisect_size(lambda t: Candidate(t, False), SearchSettings(0.5, resolution=0.05))
    assert size is None and len(tried) >= 4 and max(c.target for c in tried) > 0.95
    size, tried = bisect_size(lambda t: Candidate(t, True), SearchSettings(0.5, resolution=0.05, floor=0.02))
    assert size is not None and size - 0.02 <= 0.05
    size, tried = bisect_size(lambda t: Candidate(t, True), SearchSettings(0.5, resolution=0.001, max_candidates=3))
    assert len(tried) == 3


class _FakeStages:
    """prune_stage / finetune_stage stand-ins: a 'model' that remembers its target; validation and test
    top-1 are different curves of it, so a choice made on the test set would differ."""

    def __init__(self, monkeypatch, val_curve, test_curve, unreachable_below=0.0):
        self.pruned, self.finetuned = [], []
        from convsim_shrink import train

        def prune_stage(dense, data, cfg, **kw):
            t = cfg.target_params
            if t < unreachable_below:
                raise TargetUnreachableError(f"the smallest allowed model keeps {unreachable_below} of the parameters")
            self.pruned.append(t)
            model = torch.nn.Linear(1, 1)
            model.t = t
            result = type("R", (), {"params_ratio": t, "macs_ratio": t, "latency_ratio": None})()
            return type("P", (), {"model": model, "result": result, "accuracy": 10.0})()

        def finetune_stage(model, teacher, data, cfg, **kw):
            self.finetuned.append((model.t, cfg.epochs))
            return type("F", (), {"model": model, "accuracy": test_curve(model.t)})()

        def evaluate(model, loader, prec=None):
            if loader == "test":
                raise AssertionError("the search read the test set")
            return {"acc": val_curve(getattr(model, "t", 1.0))}

        monkeypatch.setattr(stages, "prune_stage", prune_stage)
        monkeypatch.setattr(stages, "finetune_stage", finetune_stage)
        monkeypatch.setattr(train, "evaluate", evaluate)


def _data():
    return type("D", (), {"val": "val", "test": "test", "train": "train"})()


def test_search_chooses_on_validation_with_the_short_budget(monkeypatch):
    # validation: 2 points lost per 0.1 below full size; test: no loss at all (choosing on test would pick the floor)
    fake = _FakeStages(monkeypatch, val_curve=lambda t: 90 - 20 * (1 - t), test_curve=lambda t: 90.0)
    recipe = resolve(None, sets=["prune.max_accuracy_drop=5", "prune.search_resolution=0.02", "finetune.epochs=4", "prune.search_epochs=1"])
    record = search_size(torch.nn.Linear(1, 1), _data(), recipe, example_inputs=None, device=torch.device("cpu"))
    assert record.dense_val_top1 == 90 and record.kind == "params" and record.split == "val_split"
    assert 0.75 <= record.target <= 0.77  # drop 5 at t = 0.75
    assert all(e == 1 for _, e in fake.finetuned)  # candidates get the short budget
    assert record.fine_tunings == len(record.candidates) == len(fake.pruned)
    for c in record.candidates:
        assert c.passed == (c.val_top1 >= 85 - 1e-9) and c.test_top1 == 90.0


def test_search_counts_unreachable_sizes_as_failures_and_resumes_without_redoing(monkeypatch):
    fake = _FakeStages(monkeypatch, val_curve=lambda t: 90.0, test_curve=lambda t: 90.0, unreachable_below=0.3)
    recipe = resolve(None, sets=["prune.max_accuracy_drop=0.5", "prune.search_resolution=0.05"])
    seen = []
    record = search_size(torch.nn.Linear(1, 1), _data(), recipe, example_inputs=None, device=torch.device("cpu"),
                         on_candidate=lambda r: seen.append(len(r.candidates)))
    assert 0.3 <= record.target <= 0.35 and seen == list(range(1, len(record.candidates) + 1))
    assert any(c.note and not c.passed for c in record.candidates)
    # a resumed search with every candidate recorded runs no stage again and chooses the same
    fake.pruned.clear()
    again = search_size(torch.nn.Linear(1, 1), _data(), recipe, example_inputs=None, device=torch.device("cpu"),
                        record=type(record).from_dict(record.to_dict()))
    assert fake.pruned == [] and again.target == record.target


def test_search_without_validation_is_refused():
    recipe = resolve(None, sets=["prune.max_accuracy_drop=0.5"])
    data = type("D", (), {"val": None, "test": "test"})()
    with pytest.raises(ConfigError, match="validation split"):
        search_size(torch.nn.Linear(1, 1), data, recipe, example_inputs=None, device=torch.device("cpu"))


def test_validation_is_held_out_when_the_recipe_has_none():
    r, note = with_validation(resolve(None, sets=["prune.max_accuracy_drop=0.5", "data.subset=2000"]))
    assert r.data.val_split == 200 and "200 training images held out" in note
    r, note = with_validation(resolve(None, sets=["prune.max_accuracy_drop=0.5", "data.val_split=300"]))
    assert r.data.val_split == 300 and note is None
    r, note = with_validation(resolve(None, sets=["prune.max_accuracy_drop=0.5"]))
    assert r.data.val_split == 5000 and "5000" in note


@pytest.mark.slow
def test_main_command_with_max_drop_end_to_end(tmp_path, fashion_dir):
    from convsim_shrink.pipeline.runner import Runner

    out = tmp_path / "run"
    sets = SETS + ["prune.max_accuracy_drop=100", "prune.search_resolution=0.3", "finetune.epochs=1", "prune.search_epochs=0"]
    result = Runner(resolve(None, sets=sets), out).run()
    s = result.report["size_search"]
    assert s["split"] == "held out" and s["val_images"] == 20  # a tenth of data.subset, held out of training
    assert any("20 training images held out" in n for n in result.report["notes"])
    # a drop of 100 points passes everything: bisection walks down to the floor's bracket
    assert all(c["passed"] for c in s["candidates"]) and s["target"] == min(c["target"] for c in s["candidates"])
    assert s["fine_tunings"] == 1  # candidates at 0 epochs; the winner's full budget
    assert s["winner_val_top1"] is not None and s["winner_test_top1"] == result.report["shrunk"]["accuracy"]
    assert result.report["target"]["params"] == s["target"]
    assert result.report["params_ratio"] <= s["target"]
    assert "Size search" in (out / "report.md").read_text()
    saved = resolve(str(out / "recipe.yaml"))
    assert saved.data.val_split == 20 and saved.prune.max_accuracy_drop == 100  # repeatable: the search, not its answer
