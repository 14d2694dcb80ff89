"""Every stage runs alone on a tiny model and a small slice of real Fashion-MNIST, as the runner runs it."""

import copy

import pytest
import torch
from torch import nn

from convsim_shrink.cs.similarity import model_conv_similarity
from convsim_shrink.data import INFO, DataBundle
from convsim_shrink.errors import ConfigError, UnknownNameError
from convsim_shrink.export import native as ckpt
from convsim_shrink.export.load import load
from convsim_shrink.models import create_model
from convsim_shrink.pipeline.stages import (
    build_stage,
    example_inputs_for,
    export_stage,
    finetune_stage,
    premin_stage,
    prepare_data,
    prune_stage,
    refit_batches,
    train_stage,
)
from convsim_shrink.prune.pruning import measure
from convsim_shrink.recipe import (
    ExportConfig,
    FinetuneConfig,
    ModelConfig,
    PreminConfig,
    PruneConfig,
    TrainConfig,
    resolve,
)
from convsim_shrink.train import evaluate, resolve_precision

CPU = torch.device("cpu")
X = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
FP32 = resolve_precision(CPU, "fp32", None)


@pytest.fixture(scope="module")
def data(fashion_dir) -> DataBundle:
    recipe = resolve(None, sets=["data.subset=320", "data.val_split=100", "data.test_subset=200", "train.batch_size=64"])
    return prepare_data(recipe)


def _tiny(seed=0):
    return build_stage(ModelConfig(name="simple_cnn", width=0.25), INFO["fashion-mnist"], seed=seed, example_inputs=X).model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def dense(data):
    model = _tiny()
    train_stage(model, data, TrainConfig(epochs=1, lr=0.05, precision="fp32"))
    return model


def test_prepare_data_follows_the_recipe(data):
    assert data.train.num_samples == 320 and data.val.num_samples == 100 and data.test.num_samples == 200
    assert data.train.batch_size == 64 and example_inputs_for(data.info).shape == (1, 1, 28, 28)


def test_build_stage_is_seeded_and_measures_the_model():
    a = build_stage(ModelConfig(name="simple_cnn", width=0.25), INFO["fashion-mnist"], seed=3, example_inputs=X)
    b = build_stage(ModelConfig(name="simple_cnn", width=0.25), INFO["fashion-mnist"], seed=3, example_inputs=X)
    c = build_stage(ModelConfig(name="simple_cnn", width=0.25), INFO["fashion-mnist"], seed=4, example_inputs=X)
    assert _same(a.model.state_dict(), b.model.state_dict()) and not _same(a.model.state_dict(), c.model.state_dict())
    assert a.size.params == sum(p.numel() for p in a.model.parameters()) and a.size == measure(a.model, X)
    with torch.no_grad():
        assert a.cs == pytest.approx(float(model_conv_similarity(a.model, normalized=True)), rel=1e-6)
    assert a.cs == pytest.approx(sum(a.cs_layers.values()), rel=1e-6)
    assert a.channels["features.0"] == a.model.features[0].out_channels
    with pytest.raises(UnknownNameError, match="unknown model"):
        build_stage(ModelConfig(name="resnet19"), INFO["fashion-mnist"], seed=0, example_inputs=X)


def test_build_stage_takes_a_given_model():
    given = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    out = build_stage(ModelConfig(), INFO["fashion-mnist"], seed=0, example_inputs=X, model=given)
    assert out.model is given and out.size.params == sum(p.numel() for p in given.parameters())


def test_premin_stage_lowers_cs_in_place():
    model = _tiny()
    with torch.no_grad():
        before = float(model_conv_similarity(model, normalized=True))
    out = premin_stage(model, PreminConfig(steps=10, lr=0.01))
    assert out.result.steps == 10 and out.cs < before
    assert out.cs == pytest.approx(out.result.cs_after, rel=1e-6)  # measured on the model as it is now
    unchanged = premin_stage(model, PreminConfig(steps=0))
    assert unchanged.result.steps == 0 and unchanged.cs == pytest.approx(out.cs, rel=1e-9)


def test_train_stage_trains_in_place_and_reports_test_accuracy(data):
    model = _tiny()
    start = _state(model)
    out = train_stage(model, data, TrainConfig(epochs=2, lr=0.05, precision="fp32"))
    assert out.model is model and not _same(start, model.state_dict())
    assert len(out.history) == 2 and all("val_acc" in h for h in out.history)  # validation split seen every epoch
    assert out.history[1]["train_loss"] < out.history[0]["train_loss"]  # it is learning
    assert out.accuracy == pytest.approx(evaluate(model, data.test, FP32)["acc"], abs=1e-9)


@pytest.mark.parametrize("criterion", ["l1", "convsim-taylor"])
def test_prune_stage_leaves_the_dense_model_alone_and_meets_the_target(data, dense, criterion):
    before = _state(dense)
    cfg = PruneConfig(target_params=0.5, criterion=criterion, global_pruning=criterion != "l1", bn_recalibration=3)
    out = prune_stage(dense, data, cfg, example_inputs=X)
    assert _same(before, dense.state_dict())
    assert 0.49 <= out.result.params_ratio <= 0.5
    assert sum(p.numel() for p in out.model.parameters()) == out.result.pruned.params
    assert out.bn_batches == 3 and all(p.grad is None for p in out.model.parameters())
    ft = FinetuneConfig()
    assert out.accuracy == pytest.approx(evaluate(out.model, data.test, resolve_precision(CPU, "fp32", ft.channels_last))["acc"], abs=1e-9)
    assert out.hint is None


def test_prune_stage_does_not_depend_on_the_epoch_the_training_loader_was_left_at(data, dense):
    # an uninterrupted run leaves the loader at its last training epoch, a run resumed after training at 0,
    # a benchmark's second row at the fine-tuning's last: Taylor calibration and BN re-estimation must read
    # the same batches in all three, and leave the loader where it was
    cfg = PruneConfig(target_params=0.5, criterion="convsim-taylor", bn_recalibration=3)
    states = []
    for epoch in (0, 7):
        data.train.set_epoch(epoch)
        states.append(_state(prune_stage(dense, data, cfg, example_inputs=X).model))
        assert data.train.epoch == epoch
    data.train.set_epoch(0)
    assert _same(*states)


def test_prune_stage_refits_the_compensated_model_to_the_dense_layers(data, dense):
    """prune.compensation_refit: the same channels as compensation alone, every conv/linear layer refitted (the
    report lists them), the step recorded, and the pruned model's logits closer to the dense model's on the
    refit's own training batches (least squares on them, layer by layer)."""
    cfg = PruneConfig(target_params=0.5, criterion="l1", bn_recalibration=0, compensation_batches=2)
    plain = prune_stage(dense, data, cfg, example_inputs=X)
    refit = prune_stage(dense, data, cfg.model_copy(update={"compensation_refit": 2}), example_inputs=X)
    assert refit.result.params_ratio == plain.result.params_ratio
    assert list(refit.steps) == ["dense", "dropped", "compensated", "refitted", "bn"]
    convs = [n for n, m in refit.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(refit.compensation.refitted) == sorted(convs) and "refitted" in refit.compensation.summary()
    x = torch.cat([b[0] for _, b in zip(range(2), data.train)])
    with torch.no_grad():
        want = dense.eval()(x)
        err_plain = (plain.model.eval()(x) - want).pow(2).mean().item()
        err_refit = (refit.model.eval()(x) - want).pow(2).mean().item()
    assert err_refit < err_plain
    # the norms after refitted layers hold the dense statistics the refit gave them: re-estimation leaves them alone
    with_bn = prune_stage(dense, data, cfg.model_copy(update={"compensation_refit": 2, "bn_recalibration": 2}), example_inputs=X)
    assert with_bn.compensation.refitted_norms == refit.compensation.refitted_norms != []
    for name in refit.compensation.refitted_norms:
        a, b = refit.model.get_submodule(name), with_bn.model.get_submodule(name)
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)


@pytest.mark.parametrize("sets, epochs, want", [
    ({}, 0, 4), ({}, 1, 0), ({"compensation_refit": 0}, 0, 0), ({"compensation_refit": 7}, 3, 7),
    ({"compensate": False}, 0, 0), ({"compensation_data": "kernels"}, 0, 0), ({"iterative_steps": 3}, 0, 0),
])
def test_the_refit_left_to_the_run_is_on_only_for_the_post_training_path(sets, epochs, want):
    assert refit_batches(PruneConfig(**sets), FinetuneConfig(epochs=epochs)) == want


def test_prune_stage_says_when_a_criterion_does_not_suit_global_pruning(data, dense):
    out = prune_stage(dense, data, PruneConfig(target_params=0.6, criterion="l2", bn_recalibration=0), example_inputs=X)
    assert out.bn_batches == 0 and "criterion 'l2' scores are not comparable across layers" in out.hint


def test_prune_stage_rejects_a_bad_criterion_option_before_work(data, dense):
    with pytest.raises(ConfigError, match="has no option"):
        prune_stage(dense, data, PruneConfig(criterion="l1", criterion_options={"strength": 0.5}), example_inputs=X)


def test_finetune_stage_distils_from_an_untouched_teacher(data, dense):
    pruned = prune_stage(dense, data, PruneConfig(target_params=0.5, criterion="l1", global_pruning=False), example_inputs=X).model
    teacher_before = _state(dense)
    cfg = FinetuneConfig(epochs=1, distill=0.5, precision="fp32")
    out = finetune_stage(pruned, dense, data, cfg)
    assert out.model is pruned and _same(teacher_before, dense.state_dict())
    assert len(out.history) == 1 and out.history[0]["train_kd"] > 0  # the distillation term ran
    assert out.accuracy == pytest.approx(evaluate(pruned, data.test, FP32)["acc"], abs=1e-9)
    assert out.channels["features.0"] == pruned.features[0].out_channels
    with pytest.raises(ConfigError, match="distils from the dense model"):
        finetune_stage(copy.deepcopy(pruned), None, data, cfg)
    plain = finetune_stage(copy.deepcopy(pruned), None, data, cfg.model_copy(update={"distill": 0.0}))
    assert "train_kd" not in plain.history[0]


def test_finetune_stage_runs_the_teacher_on_every_kth_step_with_distill_every(data, dense):
    pruned = prune_stage(dense, data, PruneConfig(target_params=0.5, criterion="l1", global_pruning=False), example_inputs=X).model
    forwards = []
    hook = dense.register_forward_hook(lambda m, i, o: forwards.append(1))  # travels with the stage's copy
    try:
        out = finetune_stage(pruned, dense, data, FinetuneConfig(epochs=1, distill=0.5, distill_every=3, precision="fp32"))
    finally:
        hook.remove()
    steps = len(data.train)
    assert steps >= 4 and len(forwards) == (steps + 2) // 3  # steps 1, 4, 7, ...
    assert out.history[0]["train_kd"] > 0


def test_export_stage_records_the_input_shape(tmp_path):
    model = create_model("simple_cnn", in_channels=1, width=0.25)
    out = export_stage(model, ExportConfig(formats=["convsim", "torchscript"]), tmp_path, example_inputs=X,
                       recipe={"k": 1}, metrics={"m": 2.0})
    assert set(out.exports) == {"convsim", "torchscript"} and out.onnx_max_abs_diff is None
    meta = ckpt.read_metadata(out.exports["convsim"])
    assert meta["input_shape"] == [1, 28, 28] and meta["recipe"] == {"k": 1} and meta["metrics"] == {"m": 2.0}
    assert ckpt.input_shape(out.exports["convsim"]) == (1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(load(out.exports["torchscript"])(X), model.eval()(X), atol=1e-5)


def test_export_stage_pickles_a_model_outside_the_registry(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    out = export_stage(model, ExportConfig(formats=["convsim"]), tmp_path, example_inputs=X)
    assert list(out.exports) == ["pickle"] and out.exports["pickle"].endswith("model.pt")


def test_prune_stage_meets_a_combined_params_and_latency_target(data, dense):
    cfg = PruneConfig(target_params=0.5, target_latency=0.95, latency_batch=8, latency_tolerance=0.4, criterion="l1",
                      global_pruning=False, bn_recalibration=0)
    out = prune_stage(dense, data, cfg, example_inputs=X)
    r = out.result
    assert r.params_ratio <= 0.5  # both targets hold: params by count ...
    assert r.latency is not None and r.base_latency is not None and r.latency_measurements > 0  # ... latency measured
    assert r.latency / r.base_latency <= 0.95 + 1e-9  # by the search's own (median) measurements


def test_export_stage_writes_int8_onnx_and_pt2_with_their_checks(tmp_path, data, dense):
    cfg = ExportConfig(formats=["onnx", "onnx-int8", "pt2"], int8_calibration=64)
    out = export_stage(dense, cfg, tmp_path, example_inputs=X, data=data)
    assert set(out.exports) == {"onnx", "onnx-int8", "pt2"} and all((tmp_path / p).is_file() for p in out.exports.values())
    assert out.pt2_max_abs_diff is not None and out.pt2_max_abs_diff < 1e-3
    q = out.int8
    assert q["calibration_images"] == 64 and abs(q["top1_int8"] - q["top1_fp32"]) <= 5.0
    fp32 = evaluate(dense, data.test, FP32)["acc"]
    assert q["top1_fp32"] == pytest.approx(fp32, abs=1.0)  # the fp32 ONNX model is the model
    with pytest.raises(ConfigError, match="needs training images"):
        export_stage(dense, ExportConfig(formats=["onnx-int8"]), tmp_path / "b", example_inputs=X)


def test_a_pt2_export_loads_back_with_load_without_pickle(tmp_path):
    model = create_model("simple_cnn", in_channels=1, width=0.25).eval()
    out = export_stage(model, ExportConfig(formats=["pt2"]), tmp_path, example_inputs=X)
    loaded = load(out.exports["pt2"])  # no trust_pickle needed: torch.export programs are not pickles
    with torch.no_grad():
        assert torch.allclose(loaded(X), model(X), atol=1e-5)


def test_finetune_stage_trains_at_finetune_batch_size(data, dense, monkeypatch):
    import convsim_shrink.pipeline.stages as stages

    seen = []
    real_fit = stages.fit
    monkeypatch.setattr(stages, "fit", lambda model, loader, *a, **k: seen.append(loader.batch_size) or real_fit(model, loader, *a, **k))
    pruned = copy.deepcopy(dense)
    assert data.train.batch_size == 64
    finetune_stage(pruned, None, data, FinetuneConfig(epochs=1, distill=0.0, batch_size=32, precision="fp32"))
    finetune_stage(pruned, None, data, FinetuneConfig(epochs=1, distill=0.0, precision="fp32"))  # None: train.batch_size
    assert seen == [32, 64] and data.train.batch_size == 64
    assert FinetuneConfig().batch_size is None


def test_latency_batch_is_the_finetuning_batch_capped_at_the_training_set():
    from types import SimpleNamespace

    from convsim_shrink.pipeline.stages import latency_batch_size
    from convsim_shrink.recipe import FinetuneConfig, PruneConfig

    class Loader:
        batch_size, world_size = 64, 2

        def __init__(self, n):
            self.num_samples = n

    big, tiny = SimpleNamespace(train=Loader(10_000)), SimpleNamespace(train=Loader(24))
    assert latency_batch_size(PruneConfig(), FinetuneConfig(), big) == 128  # the global batch
    assert latency_batch_size(PruneConfig(), FinetuneConfig(), tiny) == 24  # never fuller than the data
    assert latency_batch_size(PruneConfig(), FinetuneConfig(batch_size=32), big) == 32
    assert latency_batch_size(PruneConfig(latency_batch=256), FinetuneConfig(), tiny) == 256  # asked for: kept
