"""The accelerator paths (skipped without CUDA): training with bf16 autocast and deferred host syncs,
pruning a model that lives on the GPU, and CS pre-minimisation there."""

import pytest
import torch

from convsim_shrink.cs.premin import preminimize
from convsim_shrink.cs.similarity import model_conv_similarity
from convsim_shrink.data import build_data
from convsim_shrink.models import create_model
from convsim_shrink.prune.ranking import make_importance
from convsim_shrink.prune.search import prune_to_target
from convsim_shrink.recipe import DataConfig, TrainConfig
from convsim_shrink.train import evaluate, fit, resolve_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_train_prune_and_premin_on_cuda(fashion_dir):
    cuda = torch.device("cuda")
    data = build_data(DataConfig(subset=2048, test_subset=500), batch_size=128)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=1, width=0.25).to(cuda)
    before = model_conv_similarity(model, normalized=True).item()
    preminimize(model, steps=20)
    assert model_conv_similarity(model, normalized=True).item() < before
    result = fit(model, data.train, TrainConfig(epochs=2, lr=0.05, warmup_epochs=0.5), eval_loader=data.test, device=cuda, quiet=True)
    assert resolve_precision(cuda).dtype in (torch.bfloat16, torch.float16)
    assert result.final["val_acc"] > 40  # 10% untrained; the H200 run on 2026-11-26 measured 58.8
    pruned = prune_to_target(model, torch.randn(1, 1, 28, 28, device=cuda), make_importance("convsim"), target_params=0.5, global_pruning=True)
    assert pruned.params_ratio <= 0.5 and next(pruned.model.parameters()).is_cuda
    assert evaluate(pruned.model, data.test)["acc"] >= 10
