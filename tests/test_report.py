"""The run summary printed at the end of a run (report.print_summary)."""

from __future__ import annotations

import pytest

from convsim_shrink.console import console
from convsim_shrink.pipeline.report import print_summary


def _report(cs: dict) -> dict:
    return {
        "model": "tiny", "dataset": "synthetic", "criterion": "lamp",
        "dense": {"params": 1000, "macs": 20000, "accuracy": 90.0},
        "shrunk": {"params": 500, "macs": 12000, "accuracy_before_finetune": 80.0, "accuracy": 89.5},
        "params_ratio": 0.5, "macs_ratio": 0.6, "accuracy_delta": -0.5, "cs": cs, "total_seconds": 12.5,
        "speed": [{"batch": 1, "device": "cpu", "precision": "fp32", "dense_ms": 2.0, "shrunk_ms": 1.0, "speedup": 2.0}],
        "exports": {"onnx": "run/model.onnx"},
    }


def _printed(report: dict) -> list[str]:
    with console.capture() as cap:
        print_summary(report)
    return cap.get().splitlines()


def test_summary_names_cs_values_and_the_total_time():
    lines = _printed(_report({"definition": "normalized", "after_premin": 0.25, "shrunk": 1.5}))
    cs = [line for line in lines if line.startswith("CS (normalized):")]
    assert len(cs) == 1 and "after premin 0.25" in cs[0] and "shrunk 1.5" in cs[0] and cs[0].endswith("12.5 s in all")
    assert any("Latency at batch 1" in line and "2.00x faster" in line for line in lines)
    assert any("run/model.onnx" in line for line in lines) and "exports:" in lines
    long_run = [line for line in _printed({**_report({}), "total_seconds": 2436.9}) if line.strip().endswith("in all")]
    assert long_run == ["2436.9 s (40.6 min) in all"]


@pytest.mark.parametrize("cs", [{}, {"definition": "normalized"}])
def test_summary_without_cs_values_prints_no_empty_cs_field(cs):
    lines = _printed(_report(cs))
    assert not any("CS (normalized)" in line for line in lines)
    assert [line for line in lines if line.strip().startswith("12.5 s in all")], lines


def _written(tmp_path, sets: list[str], source: str) -> str:
    from convsim_shrink.pipeline.report import build_report, write_report
    from convsim_shrink.pipeline.state import RunState
    from convsim_shrink.recipe import resolve

    state = RunState.from_dict({"metrics": {"source": source, "dense_size": {"params": 100, "macs": 400},
                                            "shrunk_size": {"params": 40, "macs": 200}}})
    recipe = resolve(None, sets=sets)
    write_report(build_report(recipe, state, None), state, tmp_path)
    return (tmp_path / "report.md").read_text().splitlines()


def test_report_header_names_a_latency_target_and_width_only_for_zoo_models(tmp_path):
    lines = _written(tmp_path, ["model.name=resnet18", "model.width=0.25", "prune.target_latency=0.5", "prune.target_params=null"],
                     "zoo model resnet18, random weights")
    assert lines[0].endswith("resnet18 (width 0.25) on fashion-mnist")
    assert "target 0.5 of the latency," in lines[2]
    lines = _written(tmp_path, ["model.name=torchvision:resnet18", "prune.target_params=0.4", "prune.target_latency=0.7"],
                     "torchvision resnet18")
    assert "width" not in lines[0] and "target 0.4 of the params, 0.7 of the latency," in lines[2]


def test_summary_names_cs_points_of_skipped_stages_together():
    # a pretrained model: no pre-minimisation, no training, so three points share one value
    lines = _printed(_report({"definition": "normalized", "init": 921.9, "after_premin": 921.9, "after_train": 921.9,
                              "shrunk": 294.6}))
    cs = [line for line in lines if line.startswith("CS (normalized):")]
    assert cs == ["CS (normalized): init = after premin = after train 921.9, shrunk 294.6  |  12.5 s in all"]


def test_summary_shortens_a_timing_warning_the_stage_already_printed():
    report = _report({})
    report["speed"][0].update(spread=1.08, warning="latency at batch 1 on cpu varies by 108% between repeats (...)")
    line = next(line for line in _printed(report) if line.startswith("Latency at batch 1"))
    assert line.endswith("2.00x faster (timings spread 108%: the device looked busy; see report.md)")


def test_summary_says_slower_when_the_shrunk_model_measured_slower():
    report = _report({})
    report["speed"][0].update(dense_ms=1.0, shrunk_ms=1.39, speedup=1 / 1.39)
    line = next(line for line in _printed(report) if line.startswith("Latency at batch 1"))
    assert line.endswith("shrunk 1.39 ms, 1.39x slower")


def test_report_header_says_how_the_model_was_fine_tuned(tmp_path):
    lines = _written(tmp_path, ["finetune.epochs=0", "finetune.distill=0.5"], "zoo model resnet18, random weights")
    assert "no fine-tuning." in lines[2] and "distillation" not in lines[2]
    lines = _written(tmp_path, ["finetune.epochs=4", "finetune.distill=0.5"], "zoo model resnet18, random weights")
    assert "4 fine-tuning epochs, distillation 0.5." in lines[2]
    lines = _written(tmp_path, ["finetune.epochs=1", "finetune.distill=0"], "zoo model resnet18, random weights")
    assert "1 fine-tuning epoch, no distillation." in lines[2]


def test_summary_says_why_training_raised_cs_and_only_then():
    rise = {"definition": "normalized", "init": 922.2, "after_premin": 233.8, "after_train": 1304.0, "shrunk": 872.4}
    cs = [line for line in _printed(_report(rise)) if line.startswith("CS (normalized):")]
    assert len(cs) == 1 and "after train 1304 (training raised it: train.cs_beta is 0;" in cs[0]
    with_beta = {**_report(rise), "cs_beta": 0.01}
    cs = [line for line in _printed(with_beta) if line.startswith("CS (normalized):")]
    assert "train.cs_beta 0.01 held it only in part" in cs[0]
    fall = {**rise, "after_train": 200.0}
    cs = [line for line in _printed(_report(fall)) if line.startswith("CS (normalized):")]
    assert "raised" not in cs[0]
