import pytest
import torch
from torch import nn

import convsim_shrink
from convsim_shrink.errors import CheckpointError
from convsim_shrink.export.native import input_shape, read_metadata, save, save_full
from convsim_shrink.export.onnx import export_onnx, onnx_max_difference
from convsim_shrink.export.torchscript import export_torchscript
from convsim_shrink.models import create_model
from convsim_shrink.prune.ranking import make_importance
from convsim_shrink.prune.search import prune_to_target

X = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # drawn at import: its own generator


def _same_outputs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to round-off: two module objects may run the same kernels on differently aligned memory."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def pruned(request):
    torch.manual_seed(0)
    model = create_model(request.param, in_channels=1, width=0.25)
    result = prune_to_target(model, X, make_importance("convsim"), target_params=0.5)
    m = result.model.eval()
    with torch.no_grad():  # non-trivial BN statistics
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def test_export_round_trips_bit_for_bit(pruned, tmp_path):
    path = save(pruned, tmp_path / "m.safetensors", recipe={"prune": {"target_params": 0.5}}, metrics={"acc": 91.0})
    loaded = convsim_shrink.load(path)
    for (ka, va), (kb, vb) in zip(pruned.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)  # stored values: bit for bit
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _same_outputs(loaded(x), pruned(x))
    meta = read_metadata(path)
    assert meta["recipe"]["prune"]["target_params"] == 0.5 and meta["metrics"]["acc"] == 91.0
    assert meta["versions"]["torch"] == torch.__version__
    assert loaded.convsim_export["metrics"]["acc"] == 91.0


def test_export_contains_no_pickle(pruned, tmp_path):
    path = save(pruned, tmp_path / "m.safetensors")
    raw = path.read_bytes()
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:200]  # not a zip/pickle
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and header_len < len(raw)


def test_onnx_agrees_with_onnxruntime(pruned, tmp_path):
    path = export_onnx(pruned, tmp_path / "m.onnx", X)
    assert onnx_max_difference(pruned, path, torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))) <= 1e-4


def test_torchscript_round_trip(pruned, tmp_path):
    path = export_torchscript(pruned, tmp_path / "m.ts", X)
    loaded = convsim_shrink.load(path)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _same_outputs(loaded(x), pruned(x))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flip-header"])
def test_corrupt_files_give_a_clear_error(pruned, tmp_path, damage):
    path = save(pruned, tmp_path / "m.safetensors")
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01garbage" * 50)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(raw[:8] + raw[8:40].replace(b"{", b"[") + raw[40:])
    with pytest.raises(CheckpointError):
        convsim_shrink.load(path)


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="not a convsim-shrink export"):
        convsim_shrink.load(p)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convsim_shrink.load(tmp_path / "nope.safetensors")


def test_custom_module_needs_explicit_trust(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(X)
    with pytest.raises(CheckpointError, match="torchscript/onnx"):
        save(model, tmp_path / "x.safetensors")
    path = save_full(model, tmp_path / "full.pt")
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        convsim_shrink.load(path)
    loaded = convsim_shrink.load(path, trust_pickle=True)
    with torch.no_grad():
        assert _same_outputs(loaded(X), model.eval()(X))
        ts = export_torchscript(model, tmp_path / "x.ts", X)
        assert _same_outputs(convsim_shrink.load(ts)(X), model(X))


def test_state_dict_file_is_not_a_model(tmp_path):
    p = tmp_path / "sd.pt"
    torch.save(create_model("simple_cnn").state_dict(), p)
    with pytest.raises(CheckpointError, match="not a model"):
        convsim_shrink.load(p)


def test_input_shape_travels_in_the_header(tmp_path):
    model = create_model("simple_cnn", in_channels=3, width=0.25)
    path = save(model, tmp_path / "m.safetensors", input_shape=(3, 32, 32))
    assert read_metadata(path)["input_shape"] == [3, 32, 32] and input_shape(path) == (3, 32, 32)
    old = save(model, tmp_path / "old.safetensors")  # as files written before the shape was recorded
    assert "input_shape" not in read_metadata(old)
    with pytest.raises(CheckpointError, match="does not record its input shape.*--input-shape C,H,W"):
        input_shape(old)
