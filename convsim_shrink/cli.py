"""The command line: a thin Typer layer over the library.

``convsim-shrink MODEL [options]`` runs the whole pipeline (it is short for ``convsim-shrink shrink
MODEL``).  This module only declares options and hands them to the library (:mod:`.runner` for the
pipeline, :mod:`.tools` for evaluate/export/inspect); it does no torch work and imports nothing heavy at
the top, so ``--help`` and ``--version`` answer without loading torch.  User mistakes raise
:class:`~convsim_shrink.errors.ConvSimError` in the library; here they become one line on stderr and
exit code 2, with nothing written.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._version import __version__
from .console import console
from .errors import ConfigError, ConvSimError


class _NoFlagTypes:
    """Typer (0.29) prints a flag's type, ``<bool>``, in ``--help`` as if it took a value; a flag shows none."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class _Group(_NoFlagTypes, typer.core.TyperGroup):
    pass


class _Command(_NoFlagTypes, typer.core.TyperCommand):
    pass


app = typer.Typer(
    name="convsim-shrink",
    cls=_Group,
    help="Compress CNNs by Convolutional Similarity minimisation and similarity-ranked structural pruning.\n\n"
    "Run `convsim-shrink MODEL --target-params 0.5` to shrink MODEL (see `convsim-shrink list models`); "
    "`convsim-shrink --resume runs/RUN` continues an interrupted run.  Without a command, the arguments go to `shrink`: "
    "`convsim-shrink shrink --help` lists its options (--resume, --epochs, --set, ...).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

SUBCOMMANDS = {"shrink", "run", "sweep", "list", "evaluate", "export", "inspect"}


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
    target_latency: float | None = None,
    weights: str | None = None,
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
    nproc: int | None = None,
    max_drop: str | None = None,
) -> None:
    from .pipeline.report import print_summary
    from .pipeline.runner import Runner, default_run_dir
    from .recipe import parse_set, read_recipe_file, resolve

    drop = _max_drop(max_drop, target_params, target_macs, target_latency)
    if nproc is not None:
        for name, value in (("--target-params", target_params), ("--target-macs", target_macs), ("--target-latency", target_latency)):
            _fraction(name, value)
        _launch(nproc, model, recipe=recipe, resume=resume, out=out, sets=sets)
        return

    if resume is not None:
        recipe_file = resume / "recipe.yaml"
        if not recipe_file.is_file():
            raise ConfigError(f"{resume} is not a run directory (no recipe.yaml); give the folder a run printed at its start")
        resolved = resolve(read_recipe_file(recipe_file), overrides={"run.quiet": quiet or None})
        try:
            Runner(resolved, resume, resume=True).run()
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]: continue with `convsim-shrink --resume {resume}`")
            raise typer.Exit(130) from None
        _finish(resume, print_summary)
        return
    _fraction("--target-params", target_params)
    _fraction("--target-macs", target_macs)
    _fraction("--target-latency", target_latency)
    recipe = _model_recipe(model, recipe, data)
    overrides = {
        "model.name": model,
        "model.weights": weights,
        "prune.target_params": target_params,
        "prune.target_macs": target_macs,
        "prune.target_latency": target_latency,
        "data.name": data,
        "data.dir": str(data_dir) if data_dir else None,
        "train.epochs": epochs,
        "finetune.epochs": finetune_epochs,
        "prune.criterion": criterion,
        "run.device": device,
        "run.seed": seed,
        "run.out": str(out) if out else None,
        "run.quiet": quiet or None,
        "prune.max_accuracy_drop": drop,
    }
    resolved = resolve(recipe, overrides=overrides, sets=sets)
    run_dir = Path(resolved.run.out) if resolved.run.out else default_run_dir(resolved.model.name)
    asked = epochs if epochs is not None else next((v for k, v in map(parse_set, sets or []) if k == ["train", "epochs"]), None)
    try:
        result = Runner(resolved, run_dir, epochs_asked=asked).run()
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: finished stages and epochs (if any) are kept; continue with `convsim-shrink --resume {run_dir}`")
        raise typer.Exit(130) from None
    _finish(result.run_dir, print_summary)


def _model_recipe(model: str | None, recipe: str | dict | None, data: str | None) -> str | dict | None:
    """The recipe a model runs with when --recipe is not given: a checkpoint's own (the one it was made
    with, its data set included, unless --data names another), a zoo model's shipped recipe."""
    from .recipe import default_recipe_for

    if recipe is None and model is not None:
        from .sources.from_checkpoint import checkpoint_recipe

        # --recipe, options and --set override either
        recipe = checkpoint_recipe(model) or default_recipe_for(model)
        if isinstance(recipe, dict) and data is not None and data != (recipe.get("data") or {}).get("name"):
            recipe.pop("data", None)  # another data set: none of the recorded data settings apply
    return recipe


def _max_drop(max_drop: str | None, *targets: float | None) -> float | None:
    """``--max-drop``: parsed, and refused together with a size target on the same command line."""
    if max_drop is None:
        return None
    from .pipeline.sweep import parse_max_drop

    value = parse_max_drop(max_drop)
    if any(t is not None for t in targets):
        raise ConfigError("--max-drop searches for the size itself; leave out --target-params/--target-macs/--target-latency "
                          "(--set prune.search_kind=macs|latency sizes the search by MACs or latency)")
    return value


def _launch(nproc: int, model: str | None, *, recipe: str | None, resume: Path | None, out: Path | None, sets: list[str] | None,
            prefix: str = "") -> None:
    """``--nproc N``: this command line again in N processes under torchrun (the recipe checked here
    first, so a mistake is one line before anything starts)."""
    from .launch import launch, strip_option
    from .pipeline.runner import default_run_dir
    from .recipe import default_recipe_for, resolve
    from .train import resolve_device
    from .train.distributed import check_setup, launched

    if launched():
        raise ConfigError("--nproc starts torchrun itself; under torchrun leave it out (torchrun's --nproc-per-node says how many)")
    args = strip_option(_ARGS if _ARGS is not None else sys.argv[1:], "--nproc")
    if resume is None:
        resolved = resolve(recipe or (default_recipe_for(model) if model else None), overrides={"model.name": model}, sets=sets)
        check_setup(resolved, resolve_device(resolved.run.device), nproc)
        if out is None and not resolved.run.out:  # one name for every process
            default = default_run_dir(resolved.model.name)
            args += ["--out", str(default.parent / (prefix + default.name))]
    code = launch(nproc, args)
    if code:
        raise typer.Exit(code)


def _finish(run_dir: Path, print_summary) -> None:
    import json

    from .train.distributed import launched_rank

    if launched_rank() != 0:  # under torchrun rank 0 prints the summary
        return

    report = json.loads((Path(run_dir) / "report.json").read_text())
    print_summary(report)
    console.print(f"report: {Path(run_dir) / 'report.md'}")


TargetParams = Annotated[Optional[float], typer.Option("--target-params", help="Keep at most this fraction of the parameters (0 < R < 1; default: the recipe's prune.target_params, 0.5 in resnet18's).")]
TargetMacs = Annotated[Optional[float], typer.Option("--target-macs", help="Keep at most this fraction of the MACs (0 < R < 1; default: the recipe's prune.target_macs).")]
TargetLatency = Annotated[Optional[float], typer.Option("--target-latency", help="Shrunk model's measured latency at most this fraction of the dense model's (0 < R < 1); combines with the other targets.")]
RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", help="Recipe file or shipped recipe name (default: the model's own).")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Data set: fashion-mnist, cifar10, cifar100, imagefolder.")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Folder holding the data set.")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", min=0, help="Training epochs of the dense model (default: the recipe's train.epochs; a model with trained weights is not trained unless this is given, then this much more).")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", metavar="<name|file>", help="Trained weights: DEFAULT (the source's recommended pretrained weights: torchvision's or timm's), a torchvision weights name such as IMAGENET1K_V2 (both download once), or a state-dict file (.safetensors, or a torch file read with weights_only).")]
FtEpochsOpt = Annotated[Optional[int], typer.Option("--finetune-epochs", min=0, help="Fine-tuning epochs after pruning (default: the recipe's finetune.epochs; 0: the pruned model after compensation, the refit of every layer to the dense one (prune.compensation_refit) and BN re-estimation, no training).")]
CriterionOpt = Annotated[Optional[str], typer.Option("--criterion", help="Channel ranking: convsim-taylor, convsim, l1, l2, taylor, fpgm, lamp, bn-scale, random (see 'list criteria').")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: the recipe's run.seed).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/<model>-<timestamp>).")]
ResumeOpt = Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", metavar="<key=value>", help="Override any recipe field: --set train.lr=0.05 (repeatable; `convsim-shrink list keys` names them).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or stage lines: only notes, errors and the final summary.")]
MaxDropOpt = Annotated[Optional[str], typer.Option(
    "--max-drop", metavar="<points>", help="Instead of a size target: the smallest model whose validation top-1 after fine-tuning is within <points> of "
    "the dense model's (bisection on the size; prune.search_kind sizes it by params, macs or latency). The choice reads validation top-1 "
    "on held-out training images (data.val_split, or some held out when it is 0), never the test set; the summary gives test top-1 beside it.",
)]
NprocOpt = Annotated[Optional[int], typer.Option(
    "--nproc", min=1, help="Run in N processes on this machine (torchrun --standalone --nproc-per-node N; one GPU each on CUDA); train.batch_size is the global batch.",
)]


@app.command(cls=_Command)
def shrink(
    model: Annotated[Optional[str], typer.Argument(help="A zoo name (see `convsim-shrink list models`), torchvision:NAME, timm:NAME, package.module:function, or a checkpoint (.safetensors file or run directory). Not needed with --resume, or with a --recipe that names one.")] = None,
    target_params: TargetParams = None,
    target_macs: TargetMacs = None,
    target_latency: TargetLatency = None,
    weights: WeightsOpt = None,
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
    nproc: NprocOpt = None,
    max_drop: MaxDropOpt = None,
) -> None:
    """Run the whole pipeline: build, CS pre-minimisation, train, rank, prune, fine-tune, export.

    A model with trained weights (a checkpoint, --weights) skips pre-minimisation and dense training unless --epochs is given; its checkpoint's data set is the default --data. Options left out take the recipe's values (`convsim-shrink list keys` names every key)."""  # noqa: E501 (one paragraph: --help wraps it)
    if model is None and recipe is None and resume is None:
        raise ConfigError("name a model (e.g. `convsim-shrink resnet18`), a --recipe, or a run to --resume")
    _run_pipeline(
        model, recipe=recipe, target_params=target_params, target_macs=target_macs, target_latency=target_latency, weights=weights,
        data=data, data_dir=data_dir, epochs=epochs, finetune_epochs=finetune_epochs, criterion=criterion, device=device, seed=seed, out=out,
        resume=resume, sets=set_, quiet=quiet, nproc=nproc, max_drop=max_drop,
    )


@app.command(cls=_Command)
def sweep(
    model: Annotated[Optional[str], typer.Argument(help="Any MODEL the main command takes (a zoo name, torchvision:NAME, a checkpoint, ...).")] = None,
    targets: Annotated[Optional[str], typer.Option("--targets", help="Size targets, fractions in (0, 1) separated by commas, e.g. 0.75,0.5,0.25,0.1.")] = None,
    target_kind: Annotated[str, typer.Option("--target-kind", help="What the targets are fractions of: params, macs or latency.")] = "params",
    export_: Annotated[bool, typer.Option("--export", help="Also export each point's model in the recipe's export formats.")] = False,
    weights: WeightsOpt = None,
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
    nproc: NprocOpt = None,
) -> None:
    """The accuracy-size-latency curve: the dense model once, then each target pruned from it, fine-tuned, evaluated and timed.

    Writes sweep.md, sweep.json, sweep.csv and sweep.png (top-1 against params, MACs and latency) into one run
    directory, and each point's model; `convsim-shrink sweep --resume RUN` continues at the first unfinished point."""
    from .pipeline.runner import default_run_dir
    from .pipeline.sweep import parse_kind, parse_targets, run_sweep
    from .recipe import parse_set, read_recipe_file, resolve

    if resume is None:
        if model is None and recipe is None:
            raise ConfigError("name a model (e.g. `convsim-shrink sweep resnet18 --targets 0.75,0.5,0.25,0.1`), a --recipe, or a sweep to --resume")
        if targets is None:
            raise ConfigError("give the sizes to sweep, e.g. --targets 0.75,0.5,0.25,0.1")
        points = parse_targets(targets)
        parse_kind(target_kind)
    if nproc is not None:
        _launch(nproc, model, recipe=recipe, resume=resume, out=out, sets=set_, prefix="sweep-")
        return
    if resume is not None:
        recipe_file = resume / "recipe.yaml"
        if not recipe_file.is_file():
            raise ConfigError(f"{resume} is not a run directory (no recipe.yaml); give the folder a sweep printed at its start")
        resolved = resolve(read_recipe_file(recipe_file), overrides={"run.quiet": quiet or None})
        run_dir, kw = resume, {"resume": True, "export": export_}
    else:
        overrides = {
            "model.name": model, "model.weights": weights, "data.name": data, "data.dir": str(data_dir) if data_dir else None,
            "train.epochs": epochs, "finetune.epochs": finetune_epochs, "prune.criterion": criterion, "run.device": device,
            "run.seed": seed, "run.out": str(out) if out else None, "run.quiet": quiet or None,
        }
        resolved = resolve(_model_recipe(model, recipe, data), overrides=overrides, sets=set_)
        default = default_run_dir(resolved.model.name)
        run_dir = Path(resolved.run.out) if resolved.run.out else default.parent / ("sweep-" + default.name)
        asked = epochs if epochs is not None else next((v for k, v in map(parse_set, set_ or []) if k == ["train", "epochs"]), None)
        kw = {"targets": points, "kind": target_kind, "export": export_, "epochs_asked": asked}
    try:
        run_sweep(resolved, run_dir, **kw)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: finished points are kept; continue with `convsim-shrink sweep --resume {run_dir}`")
        raise typer.Exit(130) from None


@app.command(cls=_Command)
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe file or shipped recipe name.")],
    target_params: TargetParams = None,
    target_macs: TargetMacs = None,
    target_latency: TargetLatency = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    nproc: NprocOpt = None,
    max_drop: MaxDropOpt = None,
) -> None:
    """Run a recipe file as it is (options and --set still override it)."""
    _run_pipeline(
        None, recipe=recipe, target_params=target_params, target_macs=target_macs, target_latency=target_latency, data=None, data_dir=data_dir,
        epochs=None, finetune_epochs=None, criterion=None, device=device, seed=seed, out=out, resume=None,
        sets=set_, quiet=quiet, nproc=nproc, max_drop=max_drop,
    )


@app.command("list", cls=_Command)
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
            table.add_row(name, " ".join(description.split()))  # the whole description, its line breaks folded
        console.print(table)
    elif what == "criteria":
        from .prune.ranking import get_criterion, list_criteria

        for name in list_criteria():
            c = get_criterion(name)
            needs = [w for w, on in (("gradients", c.needs_gradients), ("layer inputs", c.needs_statistics),
                                     ("global", c.global_ranking)) if on]
            options = ", ".join(f"{k}={v}" for k, v in c.options.items())
            typer.echo(f"{name:15s} {c.description}" + (f" [{', '.join(needs)}]" if needs else "") + (f" (options: {options})" if options else ""))
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


@app.command(cls=_Command)
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="An exported model (.safetensors, or a TorchScript file).")],
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    subset: Annotated[Optional[int], typer.Option("--subset", min=10, help="Evaluate on a class-balanced test slice.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 256,
    device: DeviceOpt = None,
) -> None:
    """Top-1 accuracy of a saved model on a data set's test split."""
    from .tools import evaluate_file

    r = evaluate_file(checkpoint, data=data, data_dir=data_dir, batch_size=batch_size, subset=subset, device=device)
    typer.echo(f"{checkpoint}: top-1 {r.accuracy:.2f}% (loss {r.loss:.4f}) on {r.images} {r.dataset} test images")


@app.command(cls=_Command)
def export(
    checkpoint: Annotated[Path, typer.Argument(help="An exported model (.safetensors).")],
    format_: Annotated[str, typer.Option("--format", help="convsim, onnx, onnx-int8, pt2 or torchscript (as export.formats).")] = "onnx",
    out: Annotated[Optional[Path], typer.Option("--out", help="Output file (default: next to the checkpoint).")] = None,
    opset: Annotated[int, typer.Option("--opset", min=11)] = 17,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="C,H,W of one input (default: from the file's header).")] = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Export a saved model to any format the pipeline writes (ONNX checked against onnxruntime, int8 ONNX, pt2, TorchScript)."""
    from .pipeline.preflight import check_exports
    from .tools import export_file, parse_shape

    check_exports([format_], opset=opset)  # an unknown format or a missing package is one line, before anything is written
    shape = parse_shape(input_shape) if input_shape else None
    done = export_file(checkpoint, format_, out, opset=opset, input_shape=shape, data=data, data_dir=data_dir)
    typer.echo(f"wrote {done.path}" + (f" ({done.note})" if done.note else ""))


@app.command(cls=_Command)
def inspect(
    target: Annotated[str, typer.Argument(help="A model name or an exported model file.")],
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    images: Annotated[int, typer.Option("--images", min=0, help="Real test images for feature-map similarity (0 = skip).")] = 256,
    width: Annotated[float, typer.Option("--width", help="Width multiplier when TARGET is a model name.")] = 1.0,
) -> None:
    """Per-layer channels, Convolutional Similarity and feature-map similarity of a model or checkpoint."""
    from rich.table import Table

    from .tools import inspect_model

    result = inspect_model(target, data=data, data_dir=data_dir, images=images, width=width)
    if result.note:
        console.print(f"[yellow]{result.note}")
    table = Table("layer", "in", "out", "kernel", "groups", "CS (normalized)", "feature-map |cos|")
    for row in result.layers:
        sim = "–" if row.feature_similarity is None else f"{row.feature_similarity:.3f}"
        table.add_row(row.name, str(row.in_channels), str(row.out_channels), "x".join(map(str, row.kernel)), str(row.groups), f"{row.cs:.4g}", sim)
    console.print(table)
    console.print(f"{result.params:,} parameters; normalized CS summed over convs: {result.total_cs:.4g}")


#: the command line as given, for ``--nproc`` to start again under torchrun
_ARGS: list[str] | None = None


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``convsim-shrink MODEL ...`` is short for ``convsim-shrink shrink MODEL ...``.
    Under ``torchrun`` only rank 0 prints (progress, summary and errors)."""
    global _ARGS
    args = list(sys.argv[1:] if argv is None else argv)
    _ARGS = list(args)
    import os

    if os.environ.get("RANK", "0") not in ("", "0"):
        console.quiet = True
    if args and not args[0].startswith("-") and args[0] not in SUBCOMMANDS:
        args.insert(0, "shrink")
    elif args and args[0].startswith("--") and args[0] not in ("--help", "--version"):
        args.insert(0, "shrink")  # e.g. `convsim-shrink --resume runs/x`
    previous = _stop_on_sigterm()
    try:
        app(args=args, prog_name="convsim-shrink")
    except ConvSimError as exc:
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)  # '[timm]' in a pip command is not markup
        raise SystemExit(2) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_on_sigterm():
    """SIGTERM (``kill``, a scheduler's time limit, torchrun stopping its workers) ends a run as Ctrl-C
    does: progress bars stop and give the terminal its cursor back, the interrupt message says how to
    resume, exit 130.  Python's default for SIGTERM ends the process without unwinding any of that.
    Returns the handler it replaced (None off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


if __name__ == "__main__":
    main()
