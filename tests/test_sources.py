import copy
import sys
import textwrap
import urllib.error

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn
from torchvision.models._api import WeightsEnum

from convsim_shrink.errors import CheckpointError, ConfigError, UnknownNameError
from convsim_shrink.export import native as ckpt
from convsim_shrink.export.load import load
from convsim_shrink.models import SPEC_ATTR, create_model
from convsim_shrink.prune.safety import plan_ignored_layers, tolerant_tracing
from convsim_shrink.sources import rebuild, resolve_source
from convsim_shrink.sources.adapting import adapt_input_channels, read_state_dict
from convsim_shrink.sources.from_checkpoint import checkpoint_file
from convsim_shrink.sources.from_timm import TIMM_INSTALL

G = torch.Generator().manual_seed(0)
X1 = torch.randn(2, 1, 32, 32, generator=G)
X3 = torch.randn(2, 3, 32, 32, generator=G)


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return ya.shape == yb.shape and torch.allclose(ya, yb, atol=1e-5 * float(ya.abs().max()) + 1e-6)


def _fake_download(monkeypatch, make_state):
    """torchvision's weights 'downloaded' from a seeded model of the right architecture (no internet here)."""
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: make_state(self))


# ------------------------------------------------------------------------------------------ zoo


def test_zoo_name_and_did_you_mean():
    src = resolve_source("simple_cnn", num_classes=10, in_channels=1)
    assert not src.pretrained and src.spec["name"] == "simple_cnn" and "random" in src.description
    with pytest.raises(UnknownNameError, match="Did you mean 'resnet18'"):
        resolve_source("resnet19", num_classes=10, in_channels=1)
    with pytest.raises(ConfigError, match="--weights FILE"):
        resolve_source("simple_cnn", num_classes=10, in_channels=1, weights="DEFAULT")


def test_zoo_weights_file_is_loaded_into_the_recipes_width(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    trained = create_model("resnet18", num_classes=10, in_channels=1, width=0.25, small_input=True)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "w.safetensors"))
    src = resolve_source("resnet18", num_classes=10, in_channels=1, weights=str(tmp_path / "w.safetensors"),
                         width=0.25, small_input=True)
    assert src.pretrained and src.spec["kwargs"]["width"] == 0.25 and _same_outputs(src.model, trained, X1)
    with pytest.raises(CheckpointError):  # the zoo's full width does not fit the file
        resolve_source("resnet18", num_classes=10, in_channels=1, weights=str(tmp_path / "w.safetensors"))


# ---------------------------------------------------------------------------------- torchvision


def test_torchvision_model_adapted_to_classes_and_channels():
    torch.manual_seed(0)
    src = resolve_source("torchvision:resnet18", num_classes=7, in_channels=1)
    assert not src.pretrained
    assert src.model.conv1.in_channels == 1 and src.model.fc.out_features == 7
    assert src.model(X1).shape == (2, 7)
    assert src.spec["adapt"] == {"in_channels": 1, "stem": "conv1"}  # classes: built natively
    assert getattr(src.model, SPEC_ATTR) == src.spec


def test_torchvision_conv_classifier_found_by_tracing():
    torch.manual_seed(0)
    src = resolve_source("torchvision:squeezenet1_1", num_classes=5, in_channels=2)
    assert src.spec["adapt"]["stem"] == "features.0"
    assert src.model(torch.randn(2, 2, 64, 64, generator=G)).shape == (2, 5)


def test_torchvision_unknown_name_and_weights():
    with pytest.raises(UnknownNameError, match="Did you mean 'resnet18'") as err:
        resolve_source("torchvision:resnet19", num_classes=10, in_channels=3)
    assert "\n" not in str(err.value)
    with pytest.raises(UnknownNameError, match="IMAGENET1K_V1"):
        resolve_source("torchvision:resnet18", num_classes=10, in_channels=3, weights="IMAGENET1K_V9")
    with pytest.raises(ConfigError, match="not resnet18's"):
        resolve_source("torchvision:resnet18", num_classes=10, in_channels=3, weights="ResNet50_Weights.IMAGENET1K_V1")


def test_torchvision_weights_offline_is_one_line(monkeypatch):
    def offline(self, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ConfigError) as err:
        resolve_source("torchvision:resnet18", num_classes=10, in_channels=3, weights="DEFAULT")
    msg = str(err.value)
    assert "could not download" in msg and "--weights FILE" in msg and "\n" not in msg


def test_torchvision_pretrained_weights_adapted_not_lost(monkeypatch):
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(num_classes=1000).state_dict()
    _fake_download(monkeypatch, lambda w: imagenet)
    src = resolve_source("torchvision:resnet18", num_classes=10, in_channels=1, weights="DEFAULT")
    assert src.pretrained and "IMAGENET1K" in src.description
    m = src.model
    assert torch.equal(m.layer3[0].conv1.weight, imagenet["layer3.0.conv1.weight"])  # trunk kept
    assert m.fc.out_features == 10 and m.conv1.in_channels == 1
    # a grey image through the adapted stem = that image repeated over RGB through the original stem
    grey = torch.randn(2, 1, 16, 16, generator=G)
    want = nn.functional.conv2d(grey.repeat(1, 3, 1, 1), imagenet["conv1.weight"], stride=2, padding=3)
    got = m.conv1(grey)
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()))
    assert src.spec["weights"] == "ResNet18_Weights.IMAGENET1K_V1"


@pytest.mark.parametrize("in_channels", [1, 2])
def test_adapt_input_channels_keeps_activations_of_repeated_images(in_channels):
    w = torch.randn(4, 3, 3, 3, generator=G)
    img = torch.randn(1, 1, 8, 8, generator=G)
    want = nn.functional.conv2d(img.repeat(1, 3, 1, 1), w)
    got = nn.functional.conv2d(img.repeat(1, in_channels, 1, 1), adapt_input_channels(w, in_channels))
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()))


def test_adapt_input_channels_keeps_rgb_when_channels_are_added():
    w = torch.randn(4, 3, 3, 3, generator=G)
    rgb, depth = torch.randn(1, 3, 8, 8, generator=G), torch.randn(1, 2, 8, 8, generator=G)
    want = nn.functional.conv2d(rgb, w)
    got = nn.functional.conv2d(torch.cat([rgb, depth], 1), adapt_input_channels(w, 5))
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()))


def test_googlenet_weights_rebuild_the_builders_architecture(monkeypatch):
    """The builder changes GoogLeNet when it loads weights (transform_input, no aux heads): the spec must
    rebuild exactly that, without downloading."""
    from torchvision.models.googlenet import GoogLeNet

    torch.manual_seed(0)
    state = GoogLeNet(num_classes=1000, aux_logits=True, transform_input=True, init_weights=False).state_dict()
    _fake_download(monkeypatch, lambda w: state)
    src = resolve_source("torchvision:googlenet", num_classes=10, in_channels=3, weights="DEFAULT")
    assert src.model.transform_input and src.model.aux1 is None
    monkeypatch.undo()  # rebuilding must not need the download
    again = rebuild(src.spec)
    assert again.transform_input and again.aux1 is None
    a, b = src.model.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


def test_torchvision_weights_file_with_another_head(tmp_path):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": imagenet.state_dict()}, path)
    src = resolve_source("torchvision:resnet18", num_classes=10, in_channels=3, weights=str(path))
    assert src.pretrained and "re-initialised" in src.description
    assert torch.equal(src.model.layer1[0].conv1.weight, imagenet.layer1[0].conv1.weight)


# ------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("spec,shape", [("torchvision:resnet18", (1, 32, 32)), ("torchvision:squeezenet1_1", (3, 64, 64))])
def test_pruned_torchvision_model_loads_back_without_pickle(tmp_path, spec, shape):
    torch.manual_seed(0)
    src = resolve_source(spec, num_classes=10, in_channels=shape[0])
    x = torch.randn(1, *shape, generator=G)
    model = src.model.eval()
    plan = plan_ignored_layers(model, x, trials=False)
    pruned = copy.deepcopy(model)
    with tolerant_tracing():  # one pruning step is enough: the layer shapes change
        tp.pruner.MetaPruner(pruned, x, tp.importance.MagnitudeImportance(), pruning_ratio=0.3, ignored_layers=plan.modules(pruned)).step()
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    path = ckpt.save(pruned, tmp_path / "model.safetensors")
    back = load(path)
    assert type(back) is type(pruned)
    assert _same_outputs(pruned, back, torch.randn(2, *shape, generator=G))
    assert ckpt.read_metadata(path)["spec"]["source"] == "torchvision"


def test_zoo_checkpoint_is_a_pretrained_source(tmp_path):
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=10, in_channels=1)
    run = tmp_path / "run"
    ckpt.save(model, run / "dense.safetensors", recipe={"data": {"name": "fashion-mnist"}})
    src = resolve_source(str(run), num_classes=None, in_channels=None)
    assert src.pretrained and "fashion-mnist" in src.description and src.header["recipe"]["data"]["name"] == "fashion-mnist"
    assert _same_outputs(model, src.model, X1)
    ckpt.save(model, run / "model.safetensors")
    assert checkpoint_file(run).name == "model.safetensors"  # the run's export wins over its dense model
    with pytest.raises(ConfigError, match="predicts 10 classes but the data has 100"):
        resolve_source(str(run), num_classes=100, in_channels=1)
    with pytest.raises(ConfigError, match="drop --weights"):
        resolve_source(str(run), num_classes=10, in_channels=1, weights="DEFAULT")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without model.safetensors"):
        resolve_source(str(tmp_path / "empty"), num_classes=10, in_channels=1)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.safetensors"), num_classes=10, in_channels=1)


# ---------------------------------------------------------------------------------- weights file


def test_weights_files_safetensors_torch_and_refusals(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    trained = create_model("simple_cnn", num_classes=10, in_channels=1)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(st))
    pt = tmp_path / "w.pt"
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, pt)  # DataParallel prefix
    for path in (st, pt):
        src = resolve_source("simple_cnn", num_classes=10, in_channels=1, weights=str(path))
        assert src.pretrained and _same_outputs(trained, src.model, X1)
    pickled = tmp_path / "model.pt"
    torch.save(trained, pickled)  # a whole pickled module: never unpickled
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(pickled)
    with pytest.raises(CheckpointError) as err:
        resolve_source("resnet18", num_classes=10, in_channels=1, weights=str(st))
    msg = str(err.value)
    assert "do not fit zoo model resnet18" in msg and "missing" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pt")


# ---------------------------------------------------------------------------------- import string


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_i12"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def build_net(num_classes=10, in_channels=3, width=8):
            return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

        def not_a_model():
            return "hello"

        NUMBER = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg_i12.nets"
    for name in [m for m in sys.modules if m.startswith("userpkg_i12")]:
        del sys.modules[name]


def test_import_string_builds_and_round_trips(user_package, tmp_path):
    torch.manual_seed(0)
    src = resolve_source(f"{user_package}:build_net", num_classes=4, in_channels=1)
    assert src.spec == {"source": "import", "name": f"{user_package}:build_net", "kwargs": {"num_classes": 4, "in_channels": 1}}
    assert src.model(X1).shape == (2, 4)
    path = ckpt.save(src.model, tmp_path / "model.safetensors")
    assert _same_outputs(src.model, load(path), X1)


def test_import_string_errors_are_one_line(user_package):
    cases = [
        ("nopkg_i12.models:build", ConfigError, "cannot import 'nopkg_i12.models'"),
        (f"{user_package}:build_nett", UnknownNameError, "Did you mean 'build_net'"),
        (f"{user_package}:not_a_model", ConfigError, "returned a str, not a torch.nn.Module"),
        (f"{user_package}:NUMBER", ConfigError, "is a int, not a function"),
        ("a b:c", ConfigError, "neither a model name"),
    ]
    for spec, error, text in cases:
        with pytest.raises(error) as err:
            resolve_source(spec, num_classes=4, in_channels=1)
        assert text in str(err.value) and "\n" not in str(err.value), spec


# ------------------------------------------------------------------------------------------ timm


def test_timm_missing_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(ConfigError) as err:
        resolve_source("timm:resnet18", num_classes=10, in_channels=3)
    assert TIMM_INSTALL in str(err.value) and "\n" not in str(err.value)


def test_timm_model_round_trip(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    src = resolve_source("timm:test_resnet", num_classes=5, in_channels=1)
    assert src.spec == {"source": "timm", "name": "test_resnet", "kwargs": {"num_classes": 5, "in_chans": 1}}
    assert src.model(X1).shape == (2, 5)
    with pytest.raises(UnknownNameError, match="Did you mean"):
        resolve_source("timm:test_resnett", num_classes=5, in_channels=1)
    path = ckpt.save(src.model, tmp_path / "model.safetensors")
    assert _same_outputs(src.model, load(path), X1)
    assert timm.is_model("test_resnet")


def test_checkpoint_recipe_is_the_recorded_recipe_for_a_new_run(tmp_path):
    """Shrinking a run's checkpoint again starts from the recipe it was made with, in a new folder."""
    from convsim_shrink.recipe import resolve
    from convsim_shrink.sources.from_checkpoint import checkpoint_recipe

    recorded = resolve(None, sets=["data.subset=640", "finetune.epochs=7", "prune.round_to=8", "run.out=/old/run"]).to_dict()
    path = ckpt.save(create_model("simple_cnn", num_classes=10, in_channels=1), tmp_path / "dense.safetensors", recipe=recorded)
    recipe = checkpoint_recipe(str(path))
    assert recipe["data"]["subset"] == 640 and recipe["finetune"]["epochs"] == 7 and recipe["prune"]["round_to"] == 8
    assert "out" not in recipe["run"] and str(path) in recipe["run"]["recipe_source"]
    again = resolve(recipe, overrides={"prune.target_params": 0.3})
    assert again.run.out is None and again.finetune.epochs == 7 and again.prune.target_params == 0.3
    bare = ckpt.save(create_model("simple_cnn", num_classes=10, in_channels=1), tmp_path / "bare.safetensors")
    assert checkpoint_recipe(str(bare)) is None and checkpoint_recipe("resnet18") is None


def test_parse_spec_is_the_one_place_that_decides_the_kind(tmp_path):
    from convsim_shrink.sources import SOURCES, parse_spec

    ckpt.save(create_model("simple_cnn", num_classes=10, in_channels=1), tmp_path / "m.safetensors")
    (tmp_path / "run").mkdir()
    cases = {
        "resnet18": ("zoo", "resnet18"),
        " torchvision:resnet18 ": ("torchvision", "resnet18"),
        "timm:resnet18.a1_in1k": ("timm", "resnet18.a1_in1k"),
        "pkg.mod:build": ("import", "pkg.mod:build"),
        str(tmp_path / "m.safetensors"): ("checkpoint", str(tmp_path / "m.safetensors")),
        str(tmp_path / "missing.safetensors"): ("checkpoint", str(tmp_path / "missing.safetensors")),  # read later: one line then
        str(tmp_path / "run"): ("checkpoint", str(tmp_path / "run")),
    }
    for text, (kind, target) in cases.items():
        spec = parse_spec(text)
        assert (spec.kind, spec.target) == (kind, target) and spec.kind in SOURCES, text
    with pytest.raises(UnknownNameError, match="Did you mean 'resnet18'"):
        parse_spec("resnet19")
    for bad in ("", "a b:c", "pkg.mod:"):
        with pytest.raises(ConfigError):
            parse_spec(bad)


def test_every_registered_source_resolves_and_rebuilds():
    from convsim_shrink.sources import SOURCES

    for kind in SOURCES.values():
        impl = kind.implementation()
        assert callable(impl.resolve), kind.name
        assert callable(getattr(impl, "rebuild", None)) or kind.name == "checkpoint", kind.name
    with pytest.raises(CheckpointError, match="unknown model source 'checkpoint'"):
        rebuild({"source": "checkpoint", "name": "x"})
