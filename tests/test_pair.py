"""benchmarks/pair.py: the paired difference of two result rows, checked against a hand computation."""

import json

import pytest


def test_paired_differences_and_t_over_the_seeds_both_rows_have(benchmark_script):
    pair = benchmark_script("pair")
    first = {0: {"val": 88.0, "test": 87.5}, 1: {"val": 87.0, "test": 87.0}, 2: {"val": 86.5, "test": 86.0}, 3: {"val": 90.0, "test": 90.0}}
    second = {0: {"val": 87.5, "test": 87.0}, 1: {"val": 86.0, "test": 87.5}, 2: {"val": 86.5, "test": 86.5}}
    d = pair.paired(first, second)  # seed 3 has no partner
    # differences on val: 0.5, 1.0, 0.0 -> mean 0.5, sample sd 0.5, t = 0.5 / (0.5 / sqrt 3) = sqrt 3
    assert d["n"] == 3 and d["val"] == pytest.approx(0.5) and d["test"] == pytest.approx(-1 / 6)  # test: 0.5, -0.5, -0.5
    assert d["t"] == pytest.approx(3 ** 0.5)
    assert pair.paired(first, {7: {"val": 1.0, "test": 1.0}}) is None
    assert pair.paired(second, second)["t"] == 0.0  # no difference at all is t 0, not infinity


def test_rows_are_read_across_out_folders(benchmark_script, tmp_path, capsys):
    pair = benchmark_script("pair")
    for name, acc in (("a", 88.0), ("b", 87.0)):
        (tmp_path / name).mkdir()
        units = {f"A/ours/0.25/{s}": {"val": acc + s, "test": acc} for s in range(3)}
        units.update({f"narrow/0.25/{s}": {"val": 80.0, "test": 80.0} for s in range(3)})
        (tmp_path / name / "results.json").write_text(json.dumps(units))
    pair.main([f"{tmp_path / 'a'}:ours", f"{tmp_path / 'b'}:narrow", "--targets", "0.25"])
    out = capsys.readouterr().out
    assert "0.25: +9.00 / +8.00 (3 seeds" in out
    with pytest.raises(SystemExit, match="holds no results"):
        pair.main([f"{tmp_path}:ours", f"{tmp_path / 'b'}:ours"])
