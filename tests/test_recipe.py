from pathlib import Path

import pytest
import yaml

from convsim_shrink.errors import ConfigError, UnknownNameError
from convsim_shrink.recipe import Recipe, known_keys, list_recipes, parse_set, read_recipe_file, resolve

REQUIRED_KEYS = ["model.name", "model.width", "data.name", "data.subset", "train.epochs", "finetune.epochs",
                 "premin.steps", "prune.target_params", "prune.criterion"]


def test_required_keys_exist():
    keys = set(known_keys())
    assert set(REQUIRED_KEYS) <= keys
    for section in ("model", "data", "premin", "train", "prune", "finetune", "export"):
        assert section in keys


def test_precedence_defaults_recipe_command_line(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model: {name: vgg16_bn, width: 0.5}\ntrain: {epochs: 7, lr: 0.3}\n")
    r = resolve(f)
    assert (r.model.name, r.model.width, r.train.epochs, r.train.lr) == ("vgg16_bn", 0.5, 7, 0.3)
    assert r.finetune.epochs == Recipe().finetune.epochs  # default kept
    r = resolve(f, overrides={"train.epochs": 2, "model.width": None}, sets=["train.lr=0.01", "data.subset=500"])
    assert r.train.epochs == 2 and r.model.width == 0.5  # None never overrides
    assert r.train.lr == 0.01 and r.data.subset == 500  # --set wins over the recipe


def test_set_wins_over_options():
    r = resolve(None, overrides={"train.epochs": 3}, sets=["train.epochs=9"])
    assert r.train.epochs == 9


def test_command_line_target_replaces_recipe_target_of_other_kind(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("prune: {target_params: 0.3}\n")
    r = resolve(f, overrides={"prune.target_macs": 0.4})
    assert r.prune.target_macs == 0.4 and r.prune.target_params is None
    with pytest.raises(ConfigError, match="only one of target_params and target_macs"):
        resolve(f, sets=["prune.target_macs=0.4"])


def test_unknown_key_names_path_and_closest(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train: {epochs: 3, learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'"):
        resolve(f)
    with pytest.raises(ConfigError, match=r"unknown key 'prune.critrion'; did you mean 'prune.criterion'"):
        resolve(None, sets=["prune.critrion=l1"])
    with pytest.raises(ConfigError, match=r"unknown key 'modle'; did you mean 'model'"):
        resolve({"modle": {"name": "x"}})


@pytest.mark.parametrize("item,msg", [
    ("train.epochs=lots", "train.epochs = 'lots' is invalid"),
    ("prune.target_params=1.5", "prune.target_params = 1.5 is invalid"),
    ("model.width=-1", "model.width = -1 is invalid"),
])
def test_wrong_value_types(item, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve(None, sets=[item])


def test_parse_set():
    assert parse_set("train.lr=0.05") == (["train", "lr"], 0.05)
    assert parse_set("export.formats=[onnx, torchscript]") == (["export", "formats"], ["onnx", "torchscript"])
    assert parse_set("data.dir=") == (["data", "dir"], None)
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_set("train.lr")


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        resolve(f)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(tmp_path / "nope.yaml")
    with pytest.raises(UnknownNameError, match="unknown recipe 'resnet18-cifar11'"):
        resolve("resnet18-cifar11")


def test_every_shipped_recipe_is_valid_and_documented():
    names = list_recipes()
    for required in ("resnet18", "resnet18-cifar10"):
        assert required in names
    from convsim_shrink.models import list_models

    for model in list_models():
        assert model in names, f"no default recipe for {model}"
    for name in names:
        r = resolve(name)
        assert r.description, f"{name} says nothing about what it is for"
        assert r.model.name in list_models()


def test_resolved_recipe_round_trips_through_yaml():
    r = resolve("resnet18", sets=["train.lr=0.07"])
    again = resolve(yaml.safe_load(r.to_yaml()))
    assert again == r


def test_paper_settings_in_cifar_recipe():
    r = resolve("resnet18-cifar10")
    assert (r.train.optimizer, r.train.lr, r.train.momentum, r.train.epochs, r.train.batch_size) == ("sgd", 0.1, 0.9, 200, 128)
    assert read_recipe_file("resnet18-cifar10")["data"]["name"] == "cifar10"


def test_shipped_recipes_are_package_data():
    import convsim_shrink
    from convsim_shrink.recipe import recipe_path, shipped_recipes

    package = Path(convsim_shrink.__file__).parent
    assert Path(str(shipped_recipes())) == package / "recipes"  # inside the package, not next to the source tree
    assert list_recipes() == sorted(p.stem for p in (package / "recipes").glob("*.yaml"))
    assert Path(str(recipe_path("resnet18"))) == package / "recipes" / "resnet18.yaml"


def test_a_run_records_which_recipe_file_it_used(tmp_path, monkeypatch):
    shipped = resolve("resnet18")
    assert shipped.run.recipe_source.startswith("resnet18 (shipped: ")
    assert shipped.run.recipe_source.endswith(str(Path("convsim_shrink", "recipes", "resnet18.yaml")) + ")")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("model: {name: vgg11_bn}\n")
    assert resolve("mine.yaml").run.recipe_source == str((tmp_path / "mine.yaml").resolve())  # absolute, not as typed
    assert resolve(None).run.recipe_source is None and resolve({"train": {"epochs": 1}}).run.recipe_source is None
    # a resumed run reads its saved recipe.yaml as a mapping: the original source is kept
    assert resolve(yaml.safe_load(shipped.to_yaml())).run.recipe_source == shipped.run.recipe_source
    # a file that claims another source is overruled by the file actually read
    (tmp_path / "claims.yaml").write_text("run: {recipe_source: elsewhere}\n")
    assert resolve("claims.yaml").run.recipe_source == str((tmp_path / "claims.yaml").resolve())


def test_recipe_names_cannot_escape_the_shipped_folder():
    with pytest.raises(ConfigError, match="does not exist"):
        resolve("../recipes/resnet18")


def test_latency_target_alone_replaces_the_default_params_target():
    r = resolve({"prune": {"target_latency": 0.6}})
    assert (r.prune.target_latency, r.prune.target_params, r.prune.target_macs) == (0.6, None, None)
    assert r.prune.latency_batch is None  # the stage measures at finetune.batch_size
    # given together, both hold
    r = resolve({"prune": {"target_latency": 0.6, "target_params": 0.5, "latency_batch": 64}})
    assert (r.prune.target_latency, r.prune.target_params, r.prune.latency_batch) == (0.6, 0.5, 64)
    r = resolve({"prune": {"target_latency": 0.6, "target_macs": 0.4}})
    assert (r.prune.target_latency, r.prune.target_params, r.prune.target_macs) == (0.6, None, 0.4)


@pytest.mark.parametrize("item,msg", [
    ("prune.target_latency=1.2", "prune.target_latency = 1.2 is invalid"),
    ("prune.target_latency=0", "prune.target_latency = 0 is invalid"),
    ("prune.latency_batch=0", "prune.latency_batch = 0 is invalid"),
    ("prune.target_params=null", "set a pruning target"),
    ("export.formats=[onnx, int8]", "export.formats.1 = 'int8' is invalid"),
    ("export.int8_calibration=0", "export.int8_calibration = 0 is invalid"),
])
def test_bad_latency_and_export_settings(item, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve(None, sets=[item])


def test_new_export_formats_are_accepted():
    r = resolve(None, sets=["export.formats=[convsim, onnx-int8, pt2]"])
    assert r.export.formats == ["convsim", "onnx-int8", "pt2"] and r.export.int8_calibration == 300


def test_int8_needs_opset_13():
    with pytest.raises(ConfigError, match="onnx-int8 needs export.opset 13 or newer"):
        resolve(None, sets=["export.formats=[onnx-int8]", "export.opset=11"])
    assert resolve(None, sets=["export.formats=[onnx]", "export.opset=11"]).export.opset == 11


@pytest.mark.parametrize("text", ["line one\nline two", "trailing space \nand: colons # hash", "  leading\n\ttab",
                                  "next\x85line\u2028sep", "unicode — ≥ 0.5\nok"])
def test_recipe_yaml_keeps_multiline_text_readable_and_round_trips(text):
    import yaml

    recipe = resolve({"description": text})
    dumped = recipe.to_yaml()
    assert yaml.safe_load(dumped) == recipe.to_dict()
    if text == "line one\nline two":
        assert dumped.startswith("description: |")  # a block, as a person writes it, not a quoted string


def test_cost_exponent_needs_global_pruning():
    assert resolve(None, sets=["prune.cost_exponent=1"]).prune.cost_exponent == 1
    with pytest.raises(ConfigError, match="cost_exponent .* needs global_pruning=true"):
        resolve(None, sets=["prune.cost_exponent=1", "prune.global_pruning=false"])


@pytest.mark.parametrize("other, fix", [
    ("prune.compensate=false", "needs compensate=true"),
    ("prune.compensation_data=kernels", "needs compensation_data=train"),
    ("prune.iterative_steps=2", "set iterative_steps=1 or compensation_refit=0"),
])
def test_compensation_refit_names_the_setting_it_needs(other, fix):
    assert resolve(None, sets=["prune.compensation_refit=2"]).prune.compensation_refit == 2
    with pytest.raises(ConfigError, match=fix):
        resolve(None, sets=["prune.compensation_refit=1", other])
