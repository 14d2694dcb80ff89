"""The library side of the evaluate / export / inspect commands, called directly."""

import pytest
import torch

from convsim_shrink.cs.similarity import conv_layers, conv_similarity
from convsim_shrink.errors import CheckpointError, ConfigError, UnknownNameError
from convsim_shrink.export.load import load
from convsim_shrink.export.native import save
from convsim_shrink.export.onnx import onnx_max_difference
from convsim_shrink.models import create_model
from convsim_shrink.tools import export_file, inspect_model, parse_shape


@pytest.fixture
def cifar_shaped(tmp_path):
    torch.manual_seed(0)
    model = create_model("simple_cnn", in_channels=3, width=0.25)
    return save(model, tmp_path / "m.safetensors", recipe={"data": {"name": "cifar10"}}, input_shape=(3, 32, 32)), model


def test_export_takes_the_input_shape_from_the_header(cifar_shaped, tmp_path):
    path, model = cifar_shaped
    done = export_file(path, "onnx", tmp_path / "m.onnx")
    assert done.path == tmp_path / "m.onnx" and done.onnx_max_abs_diff <= 1e-4
    # the graph was traced at 32x32 with 3 channels: it runs there
    assert onnx_max_difference(model, done.path, torch.randn(2, 3, 32, 32)) <= 1e-4
    ts = export_file(path, "torchscript")
    assert ts.path == path.with_suffix(".ts") and ts.onnx_max_abs_diff is None
    assert load(ts.path)(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_old_file_without_a_shape_needs_it_given(tmp_path):
    model = create_model("simple_cnn", in_channels=1, width=0.25)
    old = save(model, tmp_path / "old.safetensors")
    with pytest.raises(CheckpointError, match="--input-shape"):
        export_file(old, "torchscript")
    assert not old.with_suffix(".ts").exists()
    assert export_file(old, "torchscript", input_shape=(1, 28, 28)).path.is_file()


def test_unknown_format_fails_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="--format tflite is not supported"):
        export_file(tmp_path / "missing.safetensors", "tflite")


@pytest.mark.parametrize("text,shape", [("1,28,28", (1, 28, 28)), ("3x32x32", (3, 32, 32)), (" 3, 64 ,64", (3, 64, 64))])
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1,28,", "a,b", "0,28,28", "-1,2"])
def test_bad_shape_is_a_config_error(text):
    with pytest.raises(ConfigError, match="is not a shape"):
        parse_shape(text)


def test_inspect_a_model_name_without_images():
    torch.manual_seed(0)
    result = inspect_model("simple_cnn", data="cifar10", images=0, width=0.5)
    assert result.note is None and all(row.feature_similarity is None for row in result.layers)
    torch.manual_seed(0)
    reference = create_model("simple_cnn", num_classes=10, in_channels=3, width=0.5)
    convs = list(conv_layers(reference))
    assert [row.name for row in result.layers] == [name for name, _ in convs]
    assert result.layers[0].in_channels == 3 and result.params == sum(p.numel() for p in reference.parameters())
    with torch.no_grad():
        expected = sum(float(conv_similarity(m.weight, normalized=True, groups=m.groups)) for _, m in convs)
    assert result.total_cs == pytest.approx(expected, rel=1e-6)


def test_inspect_names_an_unknown_data_set():
    with pytest.raises(UnknownNameError, match="unknown data set 'cifar11'"):
        inspect_model("simple_cnn", data="cifar11", images=0)


def test_inspect_without_the_data_says_why(tmp_path):
    result = inspect_model("simple_cnn", data="cifar10", data_dir=tmp_path, images=16, width=0.25)
    assert result.note.startswith("no feature-map similarity: cifar10 not found") and result.layers
