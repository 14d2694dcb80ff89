"""What makes Convolutional Similarity help compression? (issue 15, parts 2-3)

Every row runs the product: one dense model per (dense variant, seed), trained with the shipped recipe's
CS pre-minimisation and training settings, then ``convsim_shrink.shrink`` (the pipeline's prune and
fine-tune stages, with the shipped recipe plus the row's overrides) on a copy of it.  Rows differ only in
the recipe keys they set, so a row is what ``convsim-shrink ... --set KEY=VALUE`` gives.  Choices are made
on the validation split (held out of training); test accuracy is reported beside it.

    python benchmarks/study.py --out bench-out/study --seeds 0 1 2

Dense variants (``--dense``): ``shipped`` and ``beta=B`` (the CS regulariser through training, train.cs_beta=B).
Fine-tuning variants (``--rows``): NAME=key=value,key=value (see ROWS).  Also: the narrow model trained from
scratch for the same total epochs at each target (``narrow``).  Resumable: finished units are kept in
OUT/results.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

import convsim_shrink
from convsim_shrink.cs.premin import preminimize
from convsim_shrink.data import build_data
from convsim_shrink.io import atomic_write_bytes
from convsim_shrink.models import create_model
from convsim_shrink.prune.pruning import measure
from convsim_shrink.recipe import read_recipe_file, resolve
from convsim_shrink.train import evaluate, fit, resolve_device, seed_everything

#: fine-tuning rows: recipe overrides on top of the shipped recipe (criterion included)
ROWS = {
    "ours": {},
    "lamp": {"prune.criterion": "lamp"},
    "ours-rewind": {"finetune.lr": 0.1, "finetune.warmup_epochs": 0.5},
    "lamp-rewind": {"prune.criterion": "lamp", "finetune.lr": 0.1, "finetune.warmup_epochs": 0.5},
    "ours-kd0.9": {"finetune.distill": 0.9},
    "ours-kd0": {"finetune.distill": 0.0},
    "ours-csft": {"finetune.cs_beta": 1e-3},
    "ours-iter3": {"prune.iterative_steps": 3, "prune.steps_epochs": 1, "finetune.epochs": 2},
}


def parse_row(text: str) -> tuple[str, dict]:
    if text in ROWS:
        return text, ROWS[text]
    name, _, body = text.partition("=")
    sets = {}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition("=")
        import yaml

        sets[k] = yaml.safe_load(v)
    return name, sets


class Study:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_file = self.out / "results.json"
        self.results = json.loads(self.results_file.read_text()) if self.results_file.is_file() else {}
        self.device = resolve_device("auto")
        base = read_recipe_file(args.recipe)
        self.recipe = resolve(base, overrides={"data.subset": args.subset, "data.val_split": args.val_split,
                                                "train.epochs": args.epochs, "finetune.epochs": args.finetune_epochs})
        self.data = build_data(self.recipe.data, batch_size=self.recipe.train.batch_size, seed=0)
        self.x = torch.randn(1, self.data.info.in_channels, self.data.info.image_size, self.data.info.image_size)

    def save(self, key, value):
        self.results[key] = value
        atomic_write_bytes(self.results_file, json.dumps(self.results, indent=1).encode())
        print(f"{key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()), flush=True)

    def accuracies(self, model):
        return {"val": evaluate(model, self.data.val)["acc"], "test": evaluate(model, self.data.test)["acc"]}

    def build(self, seed, width=None):
        seed_everything(seed)
        info = self.data.info
        return create_model(self.recipe.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                            width=width or self.recipe.model.width, small_input=self.recipe.model.small_input)

    def trained(self, seed, width=None, epochs=None, cs_beta=0.0):
        """The shipped recipe's pre-minimisation + training (as the pipeline's premin and train stages)."""
        r = self.recipe
        model = self.build(seed, width)
        p = r.premin
        preminimize(model, steps=p.steps, lr=p.lr, channels=p.channels, pairs=p.pairs, patience=p.patience, mode=p.mode)
        cfg = r.train.model_copy(update={"epochs": epochs or r.train.epochs, "cs_beta": cs_beta})
        fit(model, self.data.train, cfg, device=self.device, quiet=True)
        return model

    def dense(self, variant, seed):
        key = f"dense/{variant}/{seed}"
        path = self.out / f"dense-{variant}-{seed}.safetensors"
        if key in self.results and path.is_file():
            return convsim_shrink.load(path).to(self.device)
        t0 = time.perf_counter()
        beta = float(variant.removeprefix("beta=")) if variant.startswith("beta=") else 0.0
        model = self.trained(seed, cs_beta=beta)
        convsim_shrink.save(model.cpu(), path)
        model.to(self.device)
        with torch.no_grad():
            cs = float(convsim_shrink.model_conv_similarity(model, normalized=True))
        self.save(key, {**self.accuracies(model), "cs": cs, "params": measure(model, self.x).params, "seconds": time.perf_counter() - t0})
        return model

    def shrunk(self, dense_variant, row, target, seed, dense):
        name, sets = parse_row(row)
        key = f"{dense_variant}/{name}/{target}/{seed}"
        if key in self.results:
            return
        t0 = time.perf_counter()
        seed_everything(seed)
        recipe = self.recipe.to_dict()
        overrides = {"premin.steps": 0, "train.epochs": 0, "prune.target_params": target, "run.quiet": True, **sets}
        resolved = resolve(recipe, overrides=overrides)
        result = convsim_shrink.shrink(copy.deepcopy(dense), self.data.train, self.data.val, recipe=resolved,
                                       example_inputs=self.x, num_classes=self.data.info.num_classes)
        model = result.model
        with torch.no_grad():
            cs = float(convsim_shrink.model_conv_similarity(model, normalized=True))
        self.save(key, {**self.accuracies(model), "val_pruned": result.report["shrunk"]["accuracy_before_finetune"],
                        "params_ratio": result.report["params_ratio"], "macs_ratio": result.report["macs_ratio"],
                        "cs": cs, "seconds": time.perf_counter() - t0})

    def narrow(self, target, seed, base_params):
        key = f"narrow/{target}/{seed}"
        if key in self.results:
            return
        lo, hi = 0.02, self.recipe.model.width
        for _ in range(30):  # the widest model whose parameter count is at most the target
            mid = 0.5 * (lo + hi)
            if measure(self.build(0, mid), self.x).params <= target * base_params:
                lo = mid
            else:
                hi = mid
        t0 = time.perf_counter()
        model = self.trained(seed, width=lo, epochs=self.recipe.train.epochs + self.recipe.finetune.epochs)
        self.save(key, {**self.accuracies(model), "width": lo, "params_ratio": measure(model, self.x).params / base_params,
                        "seconds": time.perf_counter() - t0})

    def run(self):
        a = self.args
        for seed in a.seeds:
            for variant in a.dense:
                dense = self.dense(variant, seed)
                for target in a.targets:
                    for row in (a.rows if variant == a.dense[0] else a.rows_other):
                        self.shrunk(variant, row, target, seed, dense)
            if a.narrow:
                base = self.results[f"dense/{a.dense[0]}/{seed}"]["params"]
                for target in a.narrow:
                    self.narrow(target, seed, base)
        self.table()

    def table(self):
        a, r = self.args, self.results
        lines = [f"Seeds {a.seeds}; validation / test top-1 %, mean over seeds; paired differences on validation.", ""]
        for variant in a.dense:
            d = [r[f"dense/{variant}/{s}"] for s in a.seeds if f"dense/{variant}/{s}" in r]
            if d:
                lines.append(f"- dense `{variant}`: val {statistics.mean(x['val'] for x in d):.2f}, test {statistics.mean(x['test'] for x in d):.2f}, "
                             f"normalized CS after training {statistics.mean(x['cs'] for x in d):.0f}")
        lines += ["", "| dense | row | target | val | test | val − dense (paired) | val − lamp (paired) | t | params ratio |", "|---|---|---|---|---|---|---|---|---|"]
        rows = {parse_row(x)[0] for x in a.rows + a.rows_other}
        for variant in a.dense:
            for row in sorted(rows):
                for target in a.targets:
                    keys = {s: f"{variant}/{row}/{target}/{s}" for s in a.seeds}
                    got = {s: r[k] for s, k in keys.items() if k in r}
                    if not got:
                        continue
                    vs_dense = [got[s]["val"] - r[f"dense/{variant}/{s}"]["val"] for s in got]
                    lamp = {s: r.get(f"{a.dense[0]}/lamp/{target}/{s}") for s in got}
                    vs_lamp = [got[s]["val"] - lamp[s]["val"] for s in got if lamp[s]]
                    lines.append(
                        f"| {variant} | {row} | {target:g} | {statistics.mean(g['val'] for g in got.values()):.2f} | "
                        f"{statistics.mean(g['test'] for g in got.values()):.2f} | {statistics.mean(vs_dense):+.2f} | "
                        f"{_mean(vs_lamp)} | {_t(vs_lamp)} | {statistics.mean(g['params_ratio'] for g in got.values()):.3f} |"
                    )
        for target in a.narrow or []:
            got = [r[f"narrow/{target}/{s}"] for s in a.seeds if f"narrow/{target}/{s}" in r]
            if got:
                lines.append(f"| narrow from scratch ({a.epochs + a.finetune_epochs} epochs) | – | {target:g} | "
                             f"{statistics.mean(g['val'] for g in got):.2f} | {statistics.mean(g['test'] for g in got):.2f} | | | | "
                             f"{statistics.mean(g['params_ratio'] for g in got):.3f} |")
        text = "\n".join(lines)
        print("\n" + text)
        atomic_write_bytes(self.out / "table.md", (text + "\n").encode())


def _mean(d):
    return f"{statistics.mean(d):+.2f}" if d else "–"


def _t(d):
    if len(d) < 2:
        return "–"
    sd = statistics.stdev(d)
    return f"{statistics.mean(d) / (sd / math.sqrt(len(d))):+.1f}" if sd > 0 else "–"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="resnet18")
    p.add_argument("--subset", type=int, default=6000)
    p.add_argument("--val-split", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.1])
    p.add_argument("--dense", nargs="+", default=["shipped"], help="shipped, beta=B")
    p.add_argument("--rows", nargs="+", default=["ours", "lamp"], help="rows on the first dense variant")
    p.add_argument("--rows-other", nargs="+", default=["ours", "lamp"], help="rows on the other dense variants")
    p.add_argument("--narrow", type=float, nargs="*", default=[], help="targets for the narrow-from-scratch baseline")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench-out/study")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    study = Study(args)
    study.table() if args.table_only else study.run()


if __name__ == "__main__":
    main()
