"""Issue 12 through the product's Python API: the failure kinds of the issue, tried with
``convsim_shrink.shrink`` on a few seeded synthetic 3x32x32 batches (the pieces themselves are tested in
test_safety.py, test_adapt.py, test_sources.py and test_data.py)."""

import copy

import pytest
import torch
from torch import nn

import convsim_shrink
from convsim_shrink.data import DataBundle, DataInfo
from convsim_shrink.errors import ConfigError, TrainingDivergedError
from convsim_shrink.pipeline.runner import Runner
from convsim_shrink.recipe import FinetuneConfig, resolve
from convsim_shrink.train import fit

from helpers import KINDS, LogitsAndFeatures, TensorSplitResidual  # the smallest failing models of the issues

#: short stages: one epoch of dense training and of fine-tuning, a few pre-minimisation steps
QUICK = {
    "premin": {"steps": 3}, "train": {"epochs": 1, "lr": 0.01}, "finetune": {"epochs": 1, "lr": 0.01},
    "prune": {"bn_recalibration": 1, "calibration_batches": 1, "round_to": None, "tolerance": 0.02},
    "run": {"quiet": True, "device": "cpu"},
}


def _batches(n=3, batch=8, channels=3, size=32, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, channels, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("make,kind,output_layer", [*KINDS, (LogitsAndFeatures, None, "fc")],
                         ids=[k[0].__name__ for k in KINDS] + ["LogitsAndFeatures"])
def test_every_failing_kind_shrinks_through_the_product(make, kind, output_layer):
    """Kinds 1-3, 6, 7 of the issue: channel shuffle, split/cat, pixel shuffle, a class-score conv, a
    training-only auxiliary head, (logits, features) outputs -- shrunk to the target, trained, still running
    with the same outputs, and the layers left alone listed in the report."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        shapes = [t.shape for t in (model.eval()(x) if isinstance(model.eval()(x), tuple) else (model.eval()(x),))]
    result = convsim_shrink.shrink(model, _batches(), _batches(1, seed=1), target_params=0.5, num_classes=10, recipe=QUICK)
    report = result.report
    assert 0.45 <= report["params_ratio"] <= 0.5  # a few coarse channel steps: below the target, said in a note
    with torch.no_grad():
        out = result.model.eval()(x)
    assert [t.shape for t in (out if isinstance(out, tuple) else (out,))] == shapes
    ignored = {e["layer"]: e["rule"] for e in report["ignored_layers"]}
    assert ignored.get(output_layer) == "output"  # the layer producing the outputs is never pruned
    if kind is not None:
        assert kind in ignored.values()
    assert report["shrunk"]["accuracy"] is not None and report["dense"]["accuracy"] is not None


def test_frozen_parameters_are_never_changed():
    """Kind 4: a stem conv and BN with requires_grad=False stay exactly as they were through
    pre-minimisation and dense training."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    for p in [*model[0].parameters(), *model[1].parameters()]:
        p.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("0.", "1.weight", "1.bias"))}
    trainable = model[3].weight.detach().clone()
    result = convsim_shrink.shrink(model, _batches(), _batches(1, seed=1), target_params=0.5, num_classes=10,
                                   recipe={**QUICK, "premin": {"steps": 20}})
    dense = result.dense_model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(dense[k], v), k
    assert not torch.equal(dense["3.weight"], trainable)  # the trainable conv did move
    assert result.report["cs"]["after_premin"] < result.report["cs"]["init"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_trained_in_float32_and_handed_back_in_its_dtype(dtype):
    """Kind 5: a model converted with .to(bfloat16) and fed float32 batches."""
    torch.manual_seed(0)
    model = LogitsAndFeatures().to(dtype)
    result = convsim_shrink.shrink(model, _batches(), _batches(1, seed=1), target_params=0.5, num_classes=10, recipe=QUICK)
    assert all(p.dtype == dtype for p in result.model.parameters())
    assert any("float32" in n for n in result.report["notes"])
    assert 0.45 <= result.report["params_ratio"] <= 0.5


def test_pretrained_model_skips_premin_and_dense_training():
    torch.manual_seed(0)
    model = LogitsAndFeatures()
    before = copy.deepcopy(model.state_dict())
    result = convsim_shrink.shrink(model, _batches(), _batches(1, seed=1), target_params=0.5, num_classes=10,
                                   pretrained=True, recipe=QUICK)
    report = result.report
    assert report["cs"]["after_premin"] == report["cs"]["init"] and report["cs"]["after_train"] == report["cs"]["init"]
    assert "dense row is this model evaluated" in report["dense"]["note"]
    assert all(torch.equal(v, before[k]) for k, v in result.dense_model.state_dict().items())
    # --epochs N (epochs=) trains it further, still without pre-minimisation
    again = convsim_shrink.shrink(LogitsAndFeatures(), _batches(), _batches(1, seed=1), target_params=0.5, num_classes=10,
                                  pretrained=True, epochs=1, recipe=QUICK)
    assert again.report["cs"]["after_premin"] == again.report["cs"]["init"] and "trained 1 more epoch" in again.report["dense"]["note"]


def test_a_training_set_without_a_batch_is_refused_before_training():
    """Kind 9: never train zero steps in silence."""
    with pytest.raises(ConfigError, match="gives no batch"):
        convsim_shrink.shrink(LogitsAndFeatures(), [], _batches(1), target_params=0.5, num_classes=10, recipe=QUICK)


def test_one_partial_batch_trains():
    result = convsim_shrink.shrink(LogitsAndFeatures(), _batches(1, batch=3), _batches(1, seed=1), target_params=0.5,
                                   num_classes=10, recipe=QUICK)
    assert result.report["params_ratio"] <= 0.5


def test_divergence_is_caught_when_it_happens_and_says_where():
    """Kind 7: a loss that blows up stops training at once with what diverged and where."""
    with pytest.raises(TrainingDivergedError) as err:
        convsim_shrink.shrink(LogitsAndFeatures(), _batches(6), _batches(1, seed=1), target_params=0.5, num_classes=10,
                              recipe={**QUICK, "premin": {"steps": 0}, "train": {"epochs": 2, "lr": 1e9, "schedule": "constant"}})
    msg = str(err.value)
    assert msg.startswith("train diverged at epoch 1, step ") and "\n" not in msg


class _NaNAfterPruning(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        return self.fc(x.mean((2, 3))) * float("nan")


def test_a_pruned_model_that_cannot_train_is_called_a_pruning_bug():
    with pytest.raises(TrainingDivergedError) as err:
        fit(_NaNAfterPruning(), _batches(2), FinetuneConfig(epochs=1, precision="fp32"), stage="finetune", quiet=True,
            device=torch.device("cpu"))
    msg = str(err.value)
    assert "finetune diverged at epoch 1, step 0" in msg and "bug in the pruning" in msg and "the loss became nan" in msg


def test_non_finite_weights_are_divergence():
    """Weights (here a batch-norm statistic, which training-mode outputs do not show) going non-finite stop
    training at the step where it shows, naming the tensor."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    model[1].running_var[0] = float("inf")
    with pytest.raises(TrainingDivergedError) as err:
        fit(model, _batches(2), resolve(QUICK).train, stage="train", quiet=True, device=torch.device("cpu"))
    assert "train diverged at epoch 1, step 0" in str(err.value) and "weights became non-finite (1.running_var)" in str(err.value)


def test_data_notes_reach_the_report(tmp_path):
    """Kind 8: what was skipped while reading the data is in report.json and report.md."""
    info = DataInfo("custom", 10, 3, 32, (), (), pad=0)
    notes = ["imagefolder: skipped 1 folder(s) that are not classes: .ipynb_checkpoints"]
    bundle = DataBundle(info, _batches(), None, _batches(1, seed=1), notes=notes)
    recipe = resolve({**QUICK, "export": {"formats": ["convsim"]}})
    torch.manual_seed(0)
    result = Runner(recipe, tmp_path / "run", model=LogitsAndFeatures(), data=bundle, example_inputs=torch.randn(1, 3, 32, 32)).run()
    assert result.report["data_notes"] == notes
    assert notes[0] in (tmp_path / "run" / "report.md").read_text()


def test_a_block_torch_pruning_cannot_walk_shrinks_within_the_recipes_graph_limit():
    """Issue 24, kind 4: torch-pruning's walk of a group through a tensor_split in a residual block never
    ends; the product stops it (its walk re-adds the same dependencies; ``prune.graph_seconds`` is the
    backstop), leaves that group alone, names it, and shrinks the rest."""
    torch.manual_seed(0)
    recipe = {**QUICK, "prune": {**QUICK["prune"], "graph_seconds": 8.0}}
    result = convsim_shrink.shrink(TensorSplitResidual(), _batches(size=16), _batches(1, size=16, seed=1), target_params=0.5,
                                   num_classes=10, recipe=recipe)
    assert 0.45 <= result.report["params_ratio"] <= 0.5
    ignored = {e["layer"]: e for e in result.report["ignored_layers"]}
    assert ignored["branch.0"]["rule"] == "graph-limit" and "a bound on its walk" in ignored["branch.0"]["reason"]
    assert result.model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
