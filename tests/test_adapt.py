import math
from collections import namedtuple

import pytest
import torch
import torchvision
from torch import nn

from convsim_shrink.errors import ConfigError
from convsim_shrink.models.adapt import (
    cast_like_model,
    dense_stages,
    diverged_loss_limit,
    divergence,
    logits_of,
    model_dtype,
    nonfinite_tensors,
    restore_dtype,
    to_float32,
)


def test_logits_rule_covers_tensor_named_tuple_dict_and_tuple():
    g = torch.Generator().manual_seed(0)
    logits, feats = torch.randn(2, 5, generator=g), torch.randn(2, 7, generator=g)
    Out = namedtuple("Out", ["aux", "logits"])
    assert logits_of(logits) is logits
    assert logits_of(Out(feats, logits)) is logits  # the named field wins over position
    assert logits_of({"features": feats, "logits": logits}) is logits
    assert logits_of((logits, feats)) is logits
    assert logits_of([logits, feats]) is logits
    assert logits_of((feats, logits), field=1) is logits
    assert logits_of({"scores": logits}, field="scores") is logits


def test_logits_of_googlenet_in_training_mode():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(num_classes=4, init_weights=False).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert not isinstance(out, torch.Tensor)  # the named tuple that crashed training (issue 12 item 6)
    assert logits_of(out) is out.logits
    assert logits_of(out).shape == (2, 4)


@pytest.mark.parametrize("output", [{"a": torch.zeros(1)}, ("text", torch.zeros(1)), 3.0, (None,)])
def test_logits_of_refuses_in_one_line_naming_the_option(output):
    with pytest.raises(ConfigError) as err:
        logits_of(output, option="--logits FIELD")
    assert "--logits FIELD" in str(err.value) and "\n" not in str(err.value)


def test_logits_of_unknown_field():
    with pytest.raises(ConfigError, match="no field 'x'"):
        logits_of({"logits": torch.zeros(1)}, field="x")


def test_model_dtype_and_casting():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(torch.bfloat16)
    assert model_dtype(model) == torch.bfloat16
    x = torch.randn(2, 3, 8, 8)
    assert cast_like_model(x, torch.bfloat16).dtype == torch.bfloat16
    ids = torch.arange(4)
    assert cast_like_model(ids, torch.bfloat16) is ids  # integer inputs left alone
    assert model(cast_like_model(x, model_dtype(model))).dtype == torch.bfloat16
    assert model_dtype(nn.ReLU()) == torch.float32


def test_to_float32_round_trip_keeps_values():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(torch.float16)
    before = model.weight.detach().clone()
    original = to_float32(model)
    assert original == torch.float16 and model.weight.dtype == torch.float32
    assert torch.equal(model.weight.detach().half(), before)  # float16 -> float32 is exact
    restore_dtype(model, original)
    assert model.weight.dtype == torch.float16
    assert to_float32(nn.Linear(2, 2)) is None


def test_divergence_rules():
    assert divergence(2.3, num_classes=10) is None
    assert "nan" in divergence(float("nan"), num_classes=10)
    assert "blew up" in divergence(4e9, num_classes=10)  # the squeezenet loss of issue 12 item 7
    assert "non-finite" in divergence(2.0, logits=torch.tensor([[0.0, float("inf")]]))
    # the limit is far above chance level for any class count
    for c in (2, 10, 1000, 21843):
        assert diverged_loss_limit(c) >= 100 * math.log(c)
        assert divergence(5 * math.log(c), num_classes=c) is None


def test_nonfinite_tensors_names_the_parameters():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert nonfinite_tensors(model) == []
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    model[1].running_var.fill_(float("inf"))
    assert nonfinite_tensors(model) == ["0.weight", "1.running_var"]


def test_dense_stages_for_pretrained_and_random_models():
    fresh = dense_stages(False, epochs=None, recipe_epochs=30, premin_steps=200)
    assert fresh.premin and fresh.train
    pretrained = dense_stages(True, epochs=None, recipe_epochs=30, premin_steps=200)
    assert not pretrained.premin and not pretrained.train and "evaluated" in pretrained.note
    more = dense_stages(True, epochs=3, recipe_epochs=30, premin_steps=200)
    assert not more.premin and more.train
    assert not dense_stages(False, epochs=0, recipe_epochs=30, premin_steps=0).train
