"""The comparison benchmark runs the product: its row equals the command line's run with the same options."""

import json

import pytest

from convsim_shrink.cli import main as cli_main

SETS = ["data.subset=300", "data.val_split=100", "data.test_subset=200", "train.epochs=1", "finetune.epochs=1", "premin.steps=5"]


@pytest.mark.slow
def test_a_benchmark_row_is_what_the_command_line_gives(benchmark_script, tmp_path, fashion_dir):
    compare = benchmark_script("compare")
    sets = [arg for s in SETS for arg in ("--set", s)]
    # two rows of the random criterion (it draws from the global generator): the second starts after the
    # first has drawn, so it matches the command line only if every row starts from the CLI's random state
    compare.main(["--preset", "smoke", "--model", "simple_cnn", "--device", "cpu", "--criteria", "random",
                  "--variant", "random-again", "prune.criterion=random", "--targets", "0.5", "--seeds", "1",
                  "--no-ablation", "--out", str(tmp_path / "bench"), *sets])
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as e:
        cli_main(["simple_cnn", "--target-params", "0.5", "--criterion", "random", "--seed", "1", "--device", "cpu",
                  "--quiet", "--out", str(out), *sets])
    assert e.value.code == 0
    report = json.loads((out / "report.json").read_text())
    state = json.loads((out / "state.json").read_text())
    assert rows["dense-A-1"]["test"] == report["dense"]["accuracy"]
    for label in ("random", "random-again"):
        row = rows[f"A/{label}/0.5/1"]
        assert row["params_ratio"] == report["params_ratio"] and row["macs_ratio"] == report["macs_ratio"]
        assert row["test_pruned"] == report["shrunk"]["accuracy_before_finetune"] and row["test"] == report["shrunk"]["accuracy"]
        # floats that any difference in settings, data or random state would move
        assert row["finetune_loss"] == state["history_finetune"][-1]["train_loss"]
        assert row["cs_shrunk"] == report["cs"]["shrunk"]


def test_results_stand_when_only_new_settings_at_their_defaults_were_added(benchmark_script):
    compare = benchmark_script("compare")
    defaults = {"train": {"lr": 0.1, "sync_bn": False}, "prune": {"criterion": "convsim-taylor"}}
    saved = {"train": {"lr": 0.1}, "prune": {"criterion": "convsim-taylor"}}
    # a setting introduced after the results were written, at its default: accepted, named
    assert compare.compare_settings(saved, {"train": {"lr": 0.1, "sync_bn": False}, "prune": {"criterion": "convsim-taylor"}},
                                    defaults) == ([], ["train.sync_bn"])
    # the new setting away from its default, a changed value, a removed setting, a new section: refused
    assert compare.compare_settings(saved, {"train": {"lr": 0.1, "sync_bn": True}, "prune": {"criterion": "convsim-taylor"}},
                                    defaults) == (["train.sync_bn"], [])
    assert compare.compare_settings(saved, {"train": {"lr": 0.05}, "prune": {"criterion": "convsim-taylor"}},
                                    defaults) == (["train.lr"], [])
    assert compare.compare_settings(saved, {"train": {}, "prune": {"criterion": "convsim-taylor"}}, defaults) == (["train.lr"], [])
    assert compare.compare_settings(saved, {**saved, "export": {"formats": []}}, defaults) == (["export"], [])
    assert compare.compare_settings(saved, saved, defaults) == ([], [])


def test_a_variant_that_sets_an_earlier_stage_is_refused_before_any_work(benchmark_script, tmp_path, capsys):
    # every row prunes the seed's shared dense model, so a training setting in a row would be silently ignored
    compare = benchmark_script("compare")
    with pytest.raises(SystemExit) as e:
        compare.main(["--preset", "smoke", "--model", "simple_cnn", "--device", "cpu", "--criteria", "l1",
                      "--variant", "beta", "train.cs_beta=0.01", "--out", str(tmp_path / "bench")])
    assert "train.cs_beta=0.01 is not a prune.* or finetune.* setting" in str(e.value.code)
    assert not (tmp_path / "bench" / "results.json").exists()


def test_the_main_preset_is_the_main_job_with_a_validation_split(benchmark_script):
    """`--preset main` must measure the command README's Quick start runs, only holding images out."""
    from convsim_shrink.recipe import default_recipe_for, resolve

    compare = benchmark_script("compare")
    preset = compare.PRESETS["main"]
    shipped = resolve(default_recipe_for(preset["model"])).to_dict()
    mine = resolve(default_recipe_for(preset["model"]), sets=list(preset["sets"])).to_dict()
    changed, added = compare.compare_settings(shipped, mine, {})
    assert changed == ["data.val_split"] and not added
    assert mine["data"]["val_split"] > 0 and mine["data"]["subset"] is None
def test_the_table_pairs_rows_by_seed_and_tells_a_difference_only_past_the_critical_t(benchmark_script, tmp_path, capsys):
    compare = benchmark_script("compare")
    out = tmp_path / "bench"
    out.mkdir()
    units = {}
    for s, (d_val, d_test) in enumerate([(1.0, 1.0), (1.2, 1.1), (0.8, 0.9)]):
        units[f"dense-A-{s}"] = {"val": 92.0, "test": 91.0, "params": 1000}
        for label, shift_val, shift_test in (("lamp", 0.0, 0.0), ("convsim-taylor", d_val, d_test), ("l1", 0.5 * s, -0.5 * s)):
            units[f"A/{label}/0.25/{s}"] = {"criterion": label, "val_pruned": 50.0, "test_pruned": 50.0, "val": 88.0 + shift_val,
                                            "test": 87.0 + shift_test, "params_ratio": 0.25, "macs_ratio": 0.3,
                                            "latency_ratio": None, "cs_shrunk": 1.0, "finetune_loss": 0.1, "seconds": 1.0}
    (out / "results.json").write_text(json.dumps(units))
    compare.main(["--table-only", "--no-ablation", "--out", str(out), "--criteria", "convsim-taylor", "lamp", "l1",
                  "--targets", "0.25", "--seeds", "0", "1", "2"])
    text = capsys.readouterr().out
    # val differences lamp − ours: -1.0, -1.2, -0.8: mean -1.0, sd 0.2, t = -1 / (0.2 / sqrt 3) = -8.66
    assert "| lamp | -1.00 / -1.00 (t = -8.7 vs 4.3, 3 seeds) |" in text
    # l1 − ours on val: -1.0, -0.7, +0.2 -> mean -0.5, sd 0.624, t = -1.39: not told; on test -1.0, -1.6, -1.9
    assert "| l1 | -0.50 / -1.50 (t = -1.4 vs 4.3, 3 seeds) |" in text
    # the verdict (on test, against the best peer by mean: lamp): 1.0, 1.1, 0.9 -> t = 17.3 > 4.30
    assert "convsim-taylor − lamp (the best peer by mean) = +1.00 points paired over 3 seeds, t = +17.32" in text
    assert "**better**" in text
