"""The command line: a thin Typer layer over the library.

``convsim-shrink MODEL [options]`` runs the whole pipeline (it is short for ``convsim-shrink shrink
MODEL``).  User mistakes raise :class:`~convsim_shrink.errors.ConvSimError` in the library; here they
become one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .console import console
from .errors import ConfigError, ConvSimError

app = typer.Typer(
    name="convsim-shrink",
    help="Compress CNNs by Convolutional Similarity minimisation and similarity-ranked structural pruning.\n\n"
    "Run `convsim-shrink MODEL --target-params 0.5` to shrink MODEL (see `convsim-shrink list models`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

SUBCOMMANDS = {"shrink", "run", "list", "evaluate", "export", "inspect"}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"convsim-shrink {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    pass


def _fraction(name: str, value: float | None) -> float | None:
    if value is not None and not 0 < value < 1:
        raise ConfigError(f"{name} {value} is out of range: give a fraction strictly between 0 and 1, e.g. {name} 0.5")
    return value


def _run_pipeline(
    model: str | None,
    *,
    recipe: str | None,
    target_params: float | None,
    target_macs: float | None,
    data: str | None,
    data_dir: Path | None,
    epochs: int | None,
    finetune_epochs: int | None,
    criterion: str | None,
    device: str | None,
    seed: int | None,
    out: Path | None,
    resume: Path | None,
    sets: list[str] | None,
    quiet: bool,
) -> None:
    from .pipeline import Pipeline, default_run_dir
    from .recipe import default_recipe_for, read_recipe_file, resolve
    from .report import print_summary

    if resume is not None:
        recipe_file = resume / "recipe.yaml"
        if not recipe_file.is_file():
            raise ConfigError(f"{resume} is not a run directory (no recipe.yaml); give the folder a run printed at its start")
        resolved = resolve(read_recipe_file(recipe_file), overrides={"run.quiet": quiet or None})
        try:
            Pipeline(resolved, resume, resume=True).run()
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]: continue with `convsim-shrink --resume {resume}`")
            raise typer.Exit(130) from None
        _finish(resume, print_summary)
        return
    _fraction("--target-params", target_params)
    _fraction("--target-macs", target_macs)
    if recipe is None and model is not None:
        recipe = default_recipe_for(model)
    overrides = {
        "model.name": model,
        "prune.target_params": target_params,
        "prune.target_macs": target_macs,
        "data.name": data,
        "data.dir": str(data_dir) if data_dir else None,
        "train.epochs": epochs,
        "finetune.epochs": finetune_epochs,
        "prune.criterion": criterion,
        "run.device": device,
        "run.seed": seed,
        "run.out": str(out) if out else None,
        "run.quiet": quiet or None,
    }
    resolved = resolve(recipe, overrides=overrides, sets=sets)
    run_dir = Path(resolved.run.out) if resolved.run.out else default_run_dir(resolved.model.name)
    pipeline = Pipeline(resolved, run_dir)
    try:
        result = pipeline.run()
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: finished epochs are checkpointed; continue with `convsim-shrink --resume {run_dir}`")
        raise typer.Exit(130) from None
    _finish(result.run_dir, print_summary)


def _finish(run_dir: Path, print_summary) -> None:
    import json

    report = json.loads((Path(run_dir) / "report.json").read_text())
    print_summary(report)
    console.print(f"report: {Path(run_dir) / 'report.md'}")


TargetParams = Annotated[Optional[float], typer.Option("--target-params", help="Keep at most this fraction of the parameters (0 < R < 1).")]
TargetMacs = Annotated[Optional[float], typer.Option("--target-macs", help="Keep at most this fraction of the MACs (0 < R < 1).")]
RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", help="Recipe file or shipped recipe name (default: the model's own).")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Data set: fashion-mnist, cifar10, cifar100, imagefolder.")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Folder holding the data set.")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", min=0, help="Training epochs of the dense model.")]
FtEpochsOpt = Annotated[Optional[int], typer.Option("--finetune-epochs", min=0, help="Fine-tuning epochs after pruning.")]
CriterionOpt = Annotated[Optional[str], typer.Option("--criterion", help="Channel ranking: convsim-taylor, convsim, l1, l2, taylor, fpgm, lamp, bn-scale, random (see 'list criteria').")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/<model>-<timestamp>).")]
ResumeOpt = Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any recipe field: --set train.lr=0.05 (repeatable).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


@app.command()
def shrink(
    model: Annotated[Optional[str], typer.Argument(help="Model name (see `convsim-shrink list models`).")] = None,
    target_params: TargetParams = None,
    target_macs: TargetMacs = None,
    recipe: RecipeOpt = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    epochs: EpochsOpt = None,
    finetune_epochs: FtEpochsOpt = None,
    criterion: CriterionOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole pipeline: build, CS pre-minimisation, train, rank, prune, fine-tune, export."""
    if model is None and recipe is None and resume is None:
        raise ConfigError("name a model (e.g. `convsim-shrink resnet18`), a --recipe, or a run to --resume")
    _run_pipeline(
        model, recipe=recipe, target_params=target_params, target_macs=target_macs, data=data, data_dir=data_dir,
        epochs=epochs, finetune_epochs=finetune_epochs, criterion=criterion, device=device, seed=seed, out=out,
        resume=resume, sets=set_, quiet=quiet,
    )


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe file or shipped recipe name.")],
    target_params: TargetParams = None,
    target_macs: TargetMacs = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe file as it is (options and --set still override it)."""
    _run_pipeline(
        None, recipe=recipe, target_params=target_params, target_macs=target_macs, data=None, data_dir=data_dir,
        epochs=None, finetune_epochs=None, criterion=None, device=device, seed=seed, out=out, resume=None,
        sets=set_, quiet=quiet,
    )


@app.command("list")
def list_(
    what: Annotated[str, typer.Argument(help="models, recipes, criteria, datasets or keys.")] = "models",
) -> None:
    """List models, recipes, criteria, data sets, or every recipe key."""
    from rich.table import Table

    if what == "models":
        from .models import list_models

        for name in list_models():
            typer.echo(name)
    elif what == "recipes":
        from .recipe import list_recipes, read_recipe_file

        table = Table("recipe", "description")
        for name in list_recipes():
            description = str(read_recipe_file(name).get("description") or "").strip()
            table.add_row(name, description.splitlines()[0] if description else "")
        console.print(table)
    elif what == "criteria":
        from .ranking import DESCRIPTIONS, list_criteria

        for name in list_criteria():
            typer.echo(f"{name:15s} {DESCRIPTIONS[name]}")
    elif what == "datasets":
        from .data import list_datasets

        for name in list_datasets():
            typer.echo(name)
    elif what == "keys":
        from .recipe import known_keys

        for key in known_keys():
            typer.echo(key)
    else:
        from .errors import unknown

        raise unknown("list", what, ["models", "recipes", "criteria", "datasets", "keys"])


def _data_for(checkpoint_meta: dict, data: str | None, data_dir: Path | None, batch_size: int, subset: int | None):
    from .data import build_data
    from .recipe import DataConfig

    saved = (checkpoint_meta.get("recipe") or {}).get("data", {})
    cfg = DataConfig(name=data or saved.get("name", "fashion-mnist"), dir=str(data_dir) if data_dir else saved.get("dir"), test_subset=subset, augment=False)
    return build_data(cfg, batch_size=batch_size)


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="An exported model (.safetensors, or a TorchScript file).")],
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    subset: Annotated[Optional[int], typer.Option("--subset", min=10, help="Evaluate on a class-balanced test slice.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 256,
    device: DeviceOpt = None,
) -> None:
    """Top-1 accuracy of a saved model on a data set's test split."""
    from . import checkpoint as ckpt
    from .engine import evaluate as evaluate_, resolve_device, resolve_precision

    model = ckpt.load(checkpoint)
    meta = ckpt.read_metadata(checkpoint) if checkpoint.suffix == ".safetensors" else {}
    bundle = _data_for(meta, data, data_dir, batch_size, subset)
    dev = resolve_device(device or "auto")
    model.to(dev)
    result = evaluate_(model, bundle.test, resolve_precision(dev, "fp32", False))
    typer.echo(f"{checkpoint}: top-1 {result['acc']:.2f}% (loss {result['loss']:.4f}) on {bundle.test.num_samples} {bundle.info.name} test images")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="An exported model (.safetensors).")],
    format_: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    out: Annotated[Optional[Path], typer.Option("--out", help="Output file (default: next to the checkpoint).")] = None,
    opset: Annotated[int, typer.Option("--opset", min=11)] = 17,
) -> None:
    """Export a saved model to ONNX (checked against onnxruntime) or TorchScript."""
    import torch

    from . import checkpoint as ckpt
    from .data import INFO

    if format_ not in ("onnx", "torchscript"):
        raise ConfigError(f"--format {format_} is not supported; use onnx or torchscript")
    from .preflight import check_exports

    check_exports([format_], opset=opset)  # a missing package is one line, before anything is written
    model = ckpt.load(checkpoint)
    meta = ckpt.read_metadata(checkpoint)
    data_name = (meta.get("recipe") or {}).get("data", {}).get("name", "fashion-mnist")
    info = INFO.get(data_name, INFO["fashion-mnist"])
    x = torch.randn(1, meta["spec"]["kwargs"].get("in_channels", info.in_channels), info.image_size, info.image_size)
    if format_ == "onnx":
        path = ckpt.export_onnx(model, out or checkpoint.with_suffix(".onnx"), x, opset=opset)
        diff = ckpt.onnx_max_difference(model, path, torch.randn(4, *x.shape[1:]))
        typer.echo(f"wrote {path} (onnxruntime max abs difference {diff:.2e})")
    else:
        path = ckpt.export_torchscript(model, out or checkpoint.with_suffix(".ts"), x)
        typer.echo(f"wrote {path}")


@app.command()
def inspect(
    target: Annotated[str, typer.Argument(help="A model name or an exported model file.")],
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    images: Annotated[int, typer.Option("--images", min=0, help="Real test images for feature-map similarity (0 = skip).")] = 256,
    width: Annotated[float, typer.Option("--width", help="Width multiplier when TARGET is a model name.")] = 1.0,
) -> None:
    """Per-layer channels, Convolutional Similarity and feature-map similarity of a model or checkpoint."""
    import torch
    from rich.table import Table

    from . import checkpoint as ckpt
    from .data import INFO, build_data, sample_batch
    from .errors import DataNotFoundError
    from .models import create_model
    from .recipe import DataConfig
    from .redundancy import feature_map_similarity
    from .similarity import conv_layers, conv_similarity

    data_name = data or "fashion-mnist"
    if Path(target).suffix in (".safetensors", ".ts", ".pt") or Path(target).is_file():
        model = ckpt.load(target)
        if Path(target).suffix == ".safetensors":
            data_name = data or (ckpt.read_metadata(target).get("recipe") or {}).get("data", {}).get("name", data_name)
    else:
        info = INFO.get(data_name, INFO["fashion-mnist"])
        model = create_model(target, num_classes=max(info.num_classes, 1), in_channels=info.in_channels, width=width)
    fm = {}
    if images:
        try:
            bundle = build_data(DataConfig(name=data_name, dir=str(data_dir) if data_dir else None, test_subset=max(images, 10), augment=False), batch_size=64)
            fm = feature_map_similarity(model, sample_batch(bundle.test, images))
        except DataNotFoundError as exc:
            console.print(f"[yellow]no feature-map similarity: {exc}")
    table = Table("layer", "in", "out", "kernel", "groups", "CS (normalized)", "feature-map |cos|")
    total = 0.0
    with torch.no_grad():
        for name, m in conv_layers(model):
            cs = float(conv_similarity(m.weight, normalized=True, groups=m.groups))
            total += cs
            table.add_row(name, str(m.in_channels), str(m.out_channels), "x".join(map(str, m.kernel_size)), str(m.groups), f"{cs:.4g}", f"{fm[name]['similarity']:.3f}" if name in fm else "–")
    console.print(table)
    params = sum(p.numel() for p in model.parameters())
    console.print(f"{params:,} parameters; normalized CS summed over convs: {total:.4g}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``convsim-shrink MODEL ...`` is short for ``convsim-shrink shrink MODEL ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and not args[0].startswith("-") and args[0] not in SUBCOMMANDS:
        args.insert(0, "shrink")
    elif args and args[0].startswith("--") and args[0] not in ("--help", "--version"):
        args.insert(0, "shrink")  # e.g. `convsim-shrink --resume runs/x`
    try:
        app(args=args, prog_name="convsim-shrink")
    except ConvSimError as exc:
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
