"""The export-format registry: every registered format writes, loads back and checks through one interface,
and every place that lists formats reads the registry."""

import typing

import pytest
import torch

from convsim_shrink.data import DataBundle, DataInfo, TensorLoader
from convsim_shrink.errors import ConfigError, UnknownNameError
from convsim_shrink.export.load import load
from convsim_shrink.export.native import save
from convsim_shrink.export.registry import FORMATS, ExportJob, get_format
from convsim_shrink.models import create_model
from convsim_shrink.pipeline import preflight
from convsim_shrink.recipe import ExportConfig
from convsim_shrink.tools import export_file

X = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))

#: how close a format's loaded-back outputs are to the eager model's (int8: quantization error)
TOLERANCE = {"convsim": 1e-6, "onnx": 1e-4, "pt2": 1e-4, "torchscript": 1e-5, "onnx-int8": None}


def _tiny_data(n=64):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    info = DataInfo("random", 10, 1, 28, (0.5,), (0.25,), pad=0)
    make = lambda train: TensorLoader(images, labels, info, batch_size=16, train=train, augment=False)  # noqa: E731
    return DataBundle(info, make(True), None, make(False))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("simple_cnn", in_channels=1, width=0.25).eval()


def test_every_place_that_lists_formats_reads_the_registry():
    assert typing.get_args(typing.get_args(ExportConfig.model_fields["formats"].annotation)[0]) == tuple(FORMATS)
    for fmt in FORMATS.values():
        impl = fmt.implementation()
        assert all(callable(getattr(impl, f, None)) for f in ("write", "load", "check")), fmt.name
        assert fmt.filename.startswith("model.") and fmt.suffix == fmt.filename[len("model"):]
    assert set(TOLERANCE) == set(FORMATS)  # a new format needs its round trip below


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="Did you mean 'onnx'") as err:
        get_format("onx")
    assert all(name in str(err.value) for name in FORMATS)
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        preflight.check_exports(["tflite"])


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_writes_what_loads_back_and_runs_like_the_model(name, model, tmp_path):
    fmt = get_format(name)
    fmt.implementation().check(17)  # the preflight passes here
    data = _tiny_data() if fmt.needs_data else None
    job = ExportJob(model, tmp_path / fmt.filename, X, data=data, int8_calibration=32)
    done = fmt.implementation().write(job)
    assert done.path == tmp_path / fmt.filename and done.path.is_file() and done.label == name
    assert [p.name for p in tmp_path.iterdir()] == [fmt.filename]  # nothing else left behind
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))  # another batch size: dynamic batch
    with torch.no_grad():
        expected = model(x)
        got = fmt.implementation().load(done.path)(x)
    assert got.shape == expected.shape
    if TOLERANCE[name] is None:  # int8: the top-1s it measured are on the record, the outputs close in argmax terms
        assert set(done.checks["int8"]) >= {"top1_fp32", "top1_int8", "calibration_images"}
        assert done.checks["int8"]["calibration_images"] == 32
        assert float((got - expected).abs().max()) < 0.5 * float(expected.abs().max()) + 1e-3
    else:
        assert float((got - expected).abs().max()) <= TOLERANCE[name]


def test_convsim_format_pickles_a_model_outside_the_registry(tmp_path):
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten()).eval()
    done = get_format("convsim").implementation().write(ExportJob(plain, tmp_path / "model.safetensors", X))
    assert done.label == "pickle" and done.path == tmp_path / "model.pt"
    assert torch.equal(load(done.path, trust_pickle=True)(X), plain(X))


def test_onnx_int8_without_data_says_what_it_needs(model, tmp_path):
    with pytest.raises(ConfigError, match="needs training images"):
        get_format("onnx-int8").implementation().write(ExportJob(model, tmp_path / "model.int8.onnx", X))


@pytest.mark.parametrize("name", ["pt2", "onnx-int8"])
def test_the_export_command_offers_formats_beyond_onnx_and_torchscript(name, model, tmp_path, monkeypatch):
    path = save(model, tmp_path / "m.safetensors", input_shape=(1, 28, 28))
    import convsim_shrink.tools as tools

    monkeypatch.setattr(tools, "_data_for", lambda *a, **k: _tiny_data())  # no data set on disk needed
    done = export_file(path, name)
    assert done.path == tmp_path / ("m" + get_format(name).suffix) and done.path.is_file() and done.note
