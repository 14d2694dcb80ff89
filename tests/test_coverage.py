"""A fast representative subset of benchmarks/coverage.py: the output-layer kind (SqueezeNet), the
channel-shuffle kind (ShuffleNet) and two common mobile nets, through the shipped default criterion."""

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("name", ["squeezenet1_1", "shufflenet_v2_x0_5", "mobilenet_v3_small", "mnasnet0_5"])
def test_representative_models_shrink_to_the_target(benchmark_script, name):
    row = benchmark_script("coverage").run_one(name, size=32, threads=1)
    assert row["status"].startswith("shrunk"), row
    assert 0.49 <= row["params_ratio"] <= 0.5
    assert row["output_matches"] and row["trains"]
    if name.startswith("shufflenet"):
        assert row["left_alone"] and "reshape" in row["left_alone"][0]


def test_table_counts_every_status(benchmark_script):
    rows = {
        "a": {"status": "shrunk", "params_ratio": 0.5, "output_matches": True, "trains": True},
        "b": {"status": "shrunk, 2 left alone", "left_alone": ["x: why", "y: why"], "params_ratio": 0.49},
        "c": {"status": "refused", "reason": "no layer can be pruned safely"},
    }
    text = benchmark_script("coverage").table(rows)
    assert "| a |" in text and "no layer can be pruned safely" in text
    assert text.splitlines()[-1] == "totals: refused 1, shrunk 2"
