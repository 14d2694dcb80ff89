import statistics
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from convsim_shrink.data import build_data
from convsim_shrink.errors import CheckpointError, ConfigError
from convsim_shrink.export import onnx as onnx_export
from convsim_shrink.export import onnx_int8, pt2
from convsim_shrink.export.onnx import export_onnx
from convsim_shrink.measure import latency
from convsim_shrink.models import create_model
from convsim_shrink.prune.ranking import make_importance
from convsim_shrink.prune.search import prune_to_target
from convsim_shrink.recipe import DataConfig, TrainConfig
from convsim_shrink.train import evaluate, fit

X = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # drawn at import: its own generator


# ------------------------------------------------------------------------------------------ latency


def test_measure_latency_returns_the_median_of_its_repeats_and_restores_the_mode():
    model = create_model("simple_cnn", in_channels=1, width=0.25).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lat = latency.measure_latency(model, (1, 28, 28), 8, warmup=1, repeats=5)
    assert len(lat.times) == 5 and lat.batch_size == 8 and lat.device == "cpu" and lat.precision == "fp32"
    assert lat.seconds == statistics.median(lat.times) > 0 and lat.spread >= 0
    assert lat.images_per_second == pytest.approx(8 / lat.seconds)
    assert model.training  # mode restored
    # eval mode and no autograd: batch-norm statistics untouched, no gradients
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_spread_is_the_interquartile_range_over_the_median():
    times = [0.0100, 0.0102, 0.0104, 0.0106, 0.0500, 0.0101, 0.0103]  # one outlier: the median and IQR ignore it
    lat = latency.summarise(times, 4, "cpu", "fp32")
    q1, q3 = np.percentile(times, [25, 75])  # numpy's linear interpolation = the 'inclusive' quantiles
    assert lat.spread == pytest.approx((q3 - q1) / np.median(times), rel=1e-12)
    assert lat.spread_warning() is None
    noisy = latency.summarise([0.01, 0.02, 0.03, 0.04, 0.05], 64, "cuda:0", "fp32")
    warning = noisy.spread_warning()
    assert "\n" not in warning and "varies by 67% between repeats" in warning and "cuda:0" in warning


def test_make_batch_from_a_shape_or_a_tensor():
    x = latency.make_batch((1, 28, 28), 5)
    assert x.shape == (5, 1, 28, 28) and torch.equal(x, latency.make_batch((1, 1, 28, 28), 5))  # seeded
    rows = torch.arange(3.0).view(3, 1, 1, 1)
    tiled = latency.make_batch(rows, 7)
    assert tiled.flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert latency.make_batch(rows, 2).flatten().tolist() == [0, 1]


def test_a_wider_model_is_not_faster():
    # 4x the channels = about 16x the MACs; timings alternate so drift hits both. Lenient on purpose: this
    # checks the measurement measures the model, not the machine's speed.
    torch.manual_seed(0)
    small = create_model("simple_cnn", in_channels=1, width=0.25)
    big = create_model("simple_cnn", in_channels=1, width=1.0)
    s, b = [], []
    for _ in range(3):
        s.append(latency.measure_latency(small, (1, 28, 28), 16, warmup=1, repeats=5).seconds)
        b.append(latency.measure_latency(big, (1, 28, 28), 16, warmup=1, repeats=5).seconds)
    assert statistics.median(b) > statistics.median(s)


def test_speed_rows_compare_dense_and_shrunk_side_by_side():
    torch.manual_seed(0)
    dense = create_model("simple_cnn", in_channels=1, width=0.5)
    shrunk = create_model("simple_cnn", in_channels=1, width=0.25)
    rows = latency.speed_rows(dense, shrunk, (1, 28, 28), (1, 8, 1), warmup=1, repeats=4, rounds=2)
    assert [r["batch"] for r in rows] == [1, 8]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["shrunk_ms"]) and r["spread"] >= 0
        assert r["device"] == "cpu" and r["precision"] == "fp32"
    lat = latency.compare_latency({"a": dense, "b": shrunk}, (1, 28, 28), 2, warmup=0, repeats=5, rounds=2)
    assert [len(v.times) for v in lat.values()] == [6, 6]  # 3 per round, pooled


def test_calibration_view_drops_augmentation(fashion_dir):
    data = build_data(DataConfig(subset=200, test_subset=100), batch_size=50)
    view = onnx_int8.calibration_view(data.train)
    assert not view.augment and view is not data.train and onnx_int8.calibration_view(data.test) is data.test
    first, _ = next(iter(view))
    again, _ = next(iter(view))
    assert torch.equal(first, again) and first.shape == (50, 1, 28, 28)


def test_bad_repeats_is_a_config_error():
    with pytest.raises(ConfigError, match="repeats >= 1"):
        latency.measure_latency(create_model("simple_cnn", in_channels=1, width=0.25), X, repeats=0)


def test_latency_meter_times_a_pruning_search_end_to_end():
    # the real timer through the real search, on a model large enough that pruning must show in the time;
    # the target is generous so that a busy machine cannot make it unreachable
    torch.manual_seed(0)
    model = create_model("simple_cnn", in_channels=1, width=1.0)
    meter = latency.latency_meter((1, 28, 28), 16, warmup=1, repeats=5)
    result = prune_to_target(model, X, make_importance("l1"), target_latency=0.8, latency_fn=meter, latency_tolerance=0.3, warn=False)
    assert result.latency_ratio <= 0.8 and result.params_ratio < 1
    assert result.latency_measurements >= 4 and result.latency_seconds > 0


# ---------------------------------------------------------------------------------------- int8 ONNX


@pytest.fixture(scope="module")
def trained(fashion_dir, tmp_path_factory):
    """A small conv net trained briefly on a slice of the real Fashion-MNIST, and its fp32 ONNX export."""
    data = build_data(DataConfig(subset=2000, test_subset=1000), batch_size=64)
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=10, in_channels=1, width=0.5)
    fit(model, data.train, TrainConfig(epochs=3, lr=0.05, precision="fp32", warmup_epochs=0.2), quiet=True)
    model.eval()
    path = export_onnx(model, tmp_path_factory.mktemp("int8") / "model.onnx", X)
    return model, data, path


def test_int8_keeps_top1_and_is_a_per_channel_qdq_graph(trained, tmp_path):
    model, data, _ = trained
    # what the export stage has: the model, example inputs, the (augmenting) training loader, the test loader
    result = onnx_int8.export_onnx_int8(model, tmp_path, X, data.train, data.test, images=256)
    out = result.path
    assert out == tmp_path / "model.int8.onnx" and [p.name for p in tmp_path.iterdir()] == ["model.int8.onnx"]
    assert result.calibration_images == 256 and result.fp32_path is None
    acc_torch = evaluate(model, data.test)["acc"]
    acc_fp32, acc_int8 = result.top1_fp32, result.top1_int8
    assert acc_int8 == onnx_export.evaluate_onnx(out, data.test)
    assert acc_torch > 60  # it learned something (chance: 10%)
    assert abs(acc_fp32 - acc_torch) <= 0.2  # the fp32 export is the model
    assert abs(acc_int8 - acc_fp32) <= 3.0
    counts = onnx_export.qdq_node_counts(out)
    assert counts.get("QuantizeLinear", 0) >= 4 and counts.get("DequantizeLinear", 0) >= 8
    # per-channel: every conv weight is dequantized with one scale per output channel
    import onnx

    graph = onnx.load(str(out)).graph
    inits = {i.name: i for i in graph.initializer}
    conv_weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    scales = [list(inits[dq[w].input[1]].dims) for w in conv_weights]
    assert len(scales) == 4 and all(len(s) == 1 and s[0] > 1 for s in scales)


def test_int8_rejects_missing_models_empty_calibration_and_old_opsets(trained, tmp_path):
    _, _, fp32 = trained
    with pytest.raises(CheckpointError, match="does not exist"):
        onnx_int8.quantize_onnx_int8(tmp_path / "nope.onnx", tmp_path / "q.onnx", [X])
    with pytest.raises(CheckpointError, match="calibration loader is empty"):
        onnx_int8.quantize_onnx_int8(fp32, tmp_path / "q.onnx", [])
    old = export_onnx(create_model("simple_cnn", in_channels=1, width=0.25), tmp_path / "old.onnx", X, opset=11)
    with pytest.raises(CheckpointError, match="opset 11; per-channel int8 needs opset 13"):
        onnx_int8.quantize_onnx_int8(old, tmp_path / "q.onnx", [X])
    assert not (tmp_path / "q.onnx").exists()


def test_onnx_latency_times_the_model_at_the_batch_asked(trained):
    _, _, fp32 = trained
    lat = latency.onnx_latency(fp32, (1, 28, 28), 16, warmup=1, repeats=4)
    assert lat.batch_size == 16 and len(lat.times) == 4 and lat.seconds == statistics.median(lat.times) > 0


def test_int8_preflight_passes_here_and_fails_in_one_line_without_the_tools(monkeypatch):
    onnx_int8.check_int8_supported()
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # import fails
    with pytest.raises(ConfigError, match="onnx-int8 needs onnx and onnxruntime") as err:
        onnx_int8.check_int8_supported()
    assert "\n" not in str(err.value)


def test_int8_preflight_turns_a_quantizer_failure_into_one_line(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no int8 kernels for this platform\nsecond line")

    monkeypatch.setattr(onnx_int8, "quantize_onnx_int8", broken)
    with pytest.raises(ConfigError, match="onnxruntime cannot quantize for this platform .*no int8 kernels") as err:
        onnx_int8.check_int8_supported()
    assert "\n" not in str(err.value) and "second line" not in str(err.value)


# ---------------------------------------------------------------------------------------------- pt2


def test_pt2_round_trip_matches_eager_at_any_batch(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=1, width=0.25)
    pruned = prune_to_target(model, X, make_importance("l1"), target_params=0.5, round_to=8, tolerance=0.15, warn=False).model
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in pruned.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    pruned.train()
    diff = pt2.export_pt2(pruned, tmp_path / "model.pt2", X)
    assert diff <= 1e-5 and pruned.training  # checked in eval mode; the caller's mode is kept
    loaded = pt2.load(tmp_path / "model.pt2")
    pruned.eval()
    with torch.no_grad():
        for batch in (1, 5, 64):
            x = torch.randn(batch, 1, 28, 28)
            expected = pruned(x)
            assert torch.allclose(loaded(x), expected, atol=1e-5 * float(expected.abs().max()) + 1e-6)
    assert not list(tmp_path.glob(".*"))  # no temporary file left


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if float(y.sum()) > 0 else -y  # a Python branch on a value: torch.export cannot trace it


def test_pt2_of_an_untraceable_model_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="torch.export cannot capture this model") as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pt2.export_pt2(_DataDependent(), tmp_path / "m.pt2", X)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_load_pt2_of_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        pt2.load(tmp_path / "nope.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    with pytest.raises(CheckpointError, match="not a readable torch.export program"):
        pt2.load(tmp_path / "junk.pt2")


def test_a_time_budget_cuts_the_repeats_of_a_slow_model_but_not_below_three():
    """A model whose pass takes ~20 ms, a budget of 0.1 s for two models: about 2 passes fit, so 3 (the floor)
    are timed, and no further warm-up runs; without a budget every repeat is timed."""
    import time as _time

    from convsim_shrink.measure.latency import compare_latency

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            _time.sleep(0.02)
            return self.lin(x)

    a, b = Slow(), Slow()
    out = compare_latency({"a": a, "b": b}, torch.zeros(1, 4), 1, repeats=20, rounds=4, time_budget=0.1)
    assert len(out["a"].times) == 3 and len(out["b"].times) == 3
    assert a.calls == 1 + 3  # one untimed pass, three timed
    fast = compare_latency({"a": torch.nn.Linear(4, 2)}, torch.zeros(1, 4), 1, repeats=20, rounds=4, time_budget=10.0)
    assert len(fast["a"].times) == 20
