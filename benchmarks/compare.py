"""Compression quality against the peers, side by side: criteria x targets x seeds, plus the pipeline
ablation, each unit run by the product itself.  A row is exactly what the command line gives:

    convsim-shrink MODEL --criterion X --target-params T --seed S --set <the preset's settings>

The settings come from the model's shipped recipe, then the preset's ``--set`` values (printed at the
top of the table), then the row's; the units call the pipeline's own stage functions
(convsim_shrink.pipeline.stages) with that resolved recipe, so channel rounding, BN re-calibration, distillation
and every other default are the shipped ones.  The dense model is trained once per seed and every row
prunes a copy of it, starting from the random-number state the command line has at that point: on the
CPU a row reproduces the command's numbers exactly.

    python benchmarks/compare.py --preset cpu     # the 2-core CPU preset (about an hour)
    python benchmarks/compare.py --preset smoke   # a few hundred images, one epoch: checks the wiring
    python benchmarks/compare.py --preset main    # the main job's recipe on all the data (hours on a CPU)
    bash benchmarks/compare_gpu.sh                # GPU preset, one process per seed

Per seed:
  dense A: build + CS pre-minimisation + train (the product's dense model)
  grid:    a copy of A pruned by every criterion (and --variant) to every target, then fine-tuned
  ablation (b) dense B = the same recipe without pre-minimisation (premin.steps=0), pruned by --b-criteria
           (d) a narrow model (width solved to match the target's parameters) trained from scratch for
               train + fine-tune epochs, without pre-minimisation
           (e) the dense model trained train + fine-tune epochs (the real baseline)
Resumable: every finished unit is kept in OUT/results.json (OUT/results-SHARD.json with --shard) and
skipped on a re-run; OUT/settings.json keeps the resolved settings and a re-run with other settings is
refused.  Model selection never looks at the test set: the preset holds --val-split training images
out, and the validation accuracy is reported next to the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import convsim_shrink
from convsim_shrink.io import atomic_path, atomic_write_bytes, atomic_write_text
from convsim_shrink.models import create_model
from convsim_shrink.pipeline.stages import (
    build_stage,
    example_inputs_for,
    finetune_stage,
    premin_stage,
    prepare_data,
    prune_stage,
    train_stage,
)
from convsim_shrink.prune.pruning import measure
from convsim_shrink.prune.ranking import get_criterion
from convsim_shrink.recipe import Recipe, default_recipe_for, resolve
from convsim_shrink.train import evaluate, resolve_device, resolve_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pair.py lives beside this script
from pair import t_critical, t_statistic  # noqa: E402  (one paired test for both scripts)

PRESETS = {
    # the issue-6 CPU comparison's data and budget, on the shipped resnet18 recipe (width 0.25, batch 128)
    # train.sparsity=0: the recipe's pruning-aware training is tuned for the main job's ~4,300 steps (issue 15);
    # these presets keep the plain training all their recorded results used (add --set train.sparsity=... for it)
    "cpu": dict(model="resnet18", sets=["data.subset=6000", "data.val_split=2000", "train.epochs=10", "finetune.epochs=4",
                                        "train.sparsity=0"]),
    # the main job itself (the shipped resnet18 recipe on all 60,000 training images, 10 + 4 epochs) with
    # 5,000 of them held out for validation: about 30 minutes of the 2-core CPU per dense model and 10 per row
    "main": dict(model="resnet18", sets=["data.val_split=5000"], criteria=["convsim-taylor", "lamp"], targets=[0.5], seeds=[0]),
    # sized for one 10-minute call on one H100/H200, one process per seed sharing the GPU; learning rates
    # scaled by sqrt(512 / 128) from the recipe's batch-128 values
    "gpu": dict(model="resnet18", sets=[
        "model.width=0.5", "data.val_split=5000", "train.epochs=8", "finetune.epochs=4", "train.batch_size=512",
        "train.lr=0.2", "finetune.lr=0.04", "train.sparsity=0",
    ]),
    # checks the wiring end to end in a minute or two; its numbers mean nothing
    "smoke": dict(model="resnet18", sets=[
        "data.subset=300", "data.val_split=100", "data.test_subset=200", "train.epochs=1", "finetune.epochs=1",
        "premin.steps=10",
    ], criteria=["convsim-taylor", "l1"], targets=[0.5], seeds=[0]),
}
CRITERIA = ["convsim-taylor", "lamp", "taylor", "l1", "random"]
TARGETS = [0.5, 0.25, 0.1]
#: command-line shortcuts for recipe keys
SHORTCUTS = {
    "width": "model.width", "subset": "data.subset", "val_split": "data.val_split", "epochs": "train.epochs",
    "finetune_epochs": "finetune.epochs", "batch_size": "train.batch_size",
}


def compare_settings(saved: dict, mine: dict, defaults: dict) -> tuple[list[str], list[str]]:
    """Which settings differ between an OUT's saved settings and this run's, as ``section.key`` names.

    Returns ``(changed, added)``: ``added`` are keys this run has that ``saved`` lacks and whose value is
    the recipe's default (a setting introduced after the results were written; a new field's default keeps
    the old behaviour, so the results still stand); every other difference, in either direction, is
    ``changed``.
    """
    added, changed = [], []
    for section in sorted(set(saved) | set(mine)):
        old, new = saved.get(section), mine.get(section)
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                changed.append(section)
            continue
        for key in sorted(set(old) | set(new)):
            if key not in old and new[key] == defaults.get(section, {}).get(key, object()):
                added.append(f"{section}.{key}")
            elif old.get(key, object()) != new.get(key, object()):
                changed.append(f"{section}.{key}")
    return changed, added


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.base = self.base_recipe()
        # one results file per shard (parallel processes, e.g. one per seed); the table merges them all
        self.results_file = self.out / (f"results-{args.shard}.json" if args.shard else "results.json")
        self.results = {}
        for f in sorted(self.out.glob("results*.json")):
            self.results.update(json.loads(f.read_text()))
        self.mine = json.loads(self.results_file.read_text()) if self.results_file.is_file() else {}
        self.started = time.perf_counter()
        self.device = resolve_device(self.base.run.device)
        self.fp32 = resolve_precision(self.device, "fp32", self.base.train.channels_last)
        # a row: a label and its recipe settings (a criterion's row only names the criterion)
        self.rows = {c: [f"prune.criterion={c}"] for c in args.criteria}
        self.rows.update({label: sets for label, *sets in args.variant or []})
        self.b_rows = {c: [f"prune.criterion={c}"] for c in args.b_criteria}
        for label, sets in self.rows.items():
            # every row prunes the seed's shared dense model: a setting of an earlier stage would be ignored
            early = [s for s in sets if not s.split("=", 1)[0].startswith(("prune.", "finetune."))]
            if early:
                raise convsim_shrink.ConvSimError(
                    f"--variant {label}: {', '.join(early)} is not a prune.* or finetune.* setting, and every row "
                    "prunes the same dense model; set it for all rows with --set and another --out")
        for sets in [*self.rows.values(), *self.b_rows.values()]:
            prune = self.recipe(sets).prune
            get_criterion(prune.criterion).create(**prune.criterion_options)  # bad names/options fail before any work
        self._data: dict[int, object] = {}

    # ------------------------------------------------------------------------------------ recipes

    def settings(self) -> list[str]:
        """The preset's settings, then the command line's shortcuts and --set values."""
        a = self.args
        shortcuts = [f"{key}={getattr(a, name)}" for name, key in SHORTCUTS.items() if getattr(a, name) is not None]
        return [*a.preset_sets, *shortcuts, *(a.set or [])]

    def base_recipe(self) -> Recipe:
        """The model's shipped recipe with :meth:`settings`, resolved as the command line resolves it."""
        a = self.args
        overrides = {"model.name": a.model, "data.dir": a.data_dir, "run.device": a.device, "run.quiet": True}
        return resolve(default_recipe_for(a.model), overrides=overrides, sets=self.settings())

    def recipe(self, sets=(), overrides: dict | None = None) -> Recipe:
        """The base recipe with a unit's settings (a ``prune.target_params`` override replaces a MACs
        target, as the command line's option does)."""
        return resolve(self.base.to_dict(), overrides=overrides, sets=list(sets))

    def tk(self, target: float) -> str:
        """A target's part of a unit's key: ``0.5`` for a params target (as before), ``macs0.5`` for MACs and
        ``latency0.5-cpu`` for a latency target (a latency ratio holds for the device it was measured on)."""
        kind = self.args.target_kind
        if kind == "params":
            return str(target)
        return f"{kind}{target}" + (f"-{self.device.type}" if kind == "latency" else "")

    def command(self) -> str:
        """The command line a grid row stands for."""
        sets = " ".join(f"--set {s}" for s in self.settings())
        return f"convsim-shrink {self.base.model.name} --criterion X --target-{self.args.target_kind} T --seed S {sets}".strip()

    def check_settings(self) -> None:
        """Refuse to mix units of different settings (or of the previous wiring) in one OUT."""
        mine = {k: v for k, v in self.base.to_dict().items() if k not in ("run", "description")}
        mine["data"] = {k: v for k, v in mine["data"].items() if k != "dir"}
        # the fine-tuning batch as it runs (None means train.batch_size): results that name it stay comparable
        if mine["finetune"].get("batch_size") is None:
            mine["finetune"]["batch_size"] = mine["train"]["batch_size"]
        path = self.out / "settings.json"
        if not path.is_file() and self.results:
            sys.exit(f"error: {self.out} holds results without settings.json (from compare.py before it ran the product); choose another --out")
        if path.is_file():
            changed, added = compare_settings(json.loads(path.read_text()), mine, Recipe().to_dict())
            if changed:
                sys.exit(f"error: {self.out} holds results of other settings ({', '.join(changed)} differ); choose another --out")
            if added:
                print(f"note: settings added since {path} was written, at their defaults: {', '.join(added)}")
                atomic_write_text(path, json.dumps(mine, indent=1))
        else:
            atomic_write_text(path, json.dumps(mine, indent=1))

    # -------------------------------------------------------------------------------------- units

    def data(self, seed: int):
        """The command line's data for ``--seed seed`` (subset and shuffling follow the seed)."""
        if seed not in self._data:
            data = prepare_data(self.recipe(overrides={"run.seed": seed}))
            if self.device.type != "cpu":
                for loader in (data.train, data.val, data.test):
                    if loader is not None and hasattr(loader, "to"):
                        loader.to(self.device)
            self._data[seed] = data
        return self._data[seed]

    def out_of_time(self) -> bool:
        return self.args.time_budget is not None and time.perf_counter() - self.started > self.args.time_budget

    def save(self, key, value):
        self.results[key] = value
        self.mine[key] = value
        atomic_write_text(self.results_file, json.dumps(self.mine, indent=1))
        print(f"{key}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in value.items()})}", flush=True)

    def val(self, model, data) -> float | None:
        return evaluate(model, data.val, self.fp32)["acc"] if data.val is not None else None

    def train_from_scratch(self, recipe: Recipe, data):
        """build -> premin -> train as the runner runs them; returns the model and its test accuracy."""
        x = example_inputs_for(data.info)
        built = build_stage(recipe.model, data.info, seed=recipe.run.seed, example_inputs=x, device=self.device)
        premin_stage(built.model, recipe.premin)
        trained = train_stage(built.model, data, recipe.train, device=self.device)
        return trained.model, trained.accuracy, built.size.params

    def dense(self, seed: int, premin: bool):
        """The seed's dense model (trained once, kept in OUT) and the random-number state after training."""
        name = f"dense-{'A' if premin else 'B'}-{seed}"
        path, rng_path = self.out / f"{name}.safetensors", self.out / f"{name}.rng"
        if path.is_file() and rng_path.is_file() and name in self.results:
            rng = torch.frombuffer(bytearray(rng_path.read_bytes()), dtype=torch.uint8).clone()
            return convsim_shrink.load(path).to(self.device), rng
        recipe = self.recipe(overrides={"run.seed": seed, "premin.steps": None if premin else 0})
        data = self.data(seed)
        t0 = time.perf_counter()
        model, test, params = self.train_from_scratch(recipe, data)
        rng = torch.get_rng_state()
        convsim_shrink.save(model.cpu(), path, recipe=recipe.to_dict(), input_shape=tuple(example_inputs_for(data.info).shape[1:]))
        atomic_write_bytes(rng_path, rng.numpy().tobytes())
        model.to(self.device)
        self.save(name, {"val": self.val(model, data), "test": test, "params": params, "seconds": time.perf_counter() - t0})
        return model, rng

    def prune_finetune(self, key, dense, rng, sets, target, seed):
        """One grid unit: the command line's prune and fine-tune stages on a copy of ``dense``."""
        if key in self.results or self.out_of_time():
            return
        recipe = self.recipe(sets, {f"prune.target_{self.args.target_kind}": target, "run.seed": seed})
        data = self.data(seed)
        x = example_inputs_for(data.info)  # drawn before the state is set: the runner draws it before seeding
        torch.set_rng_state(rng)
        t0 = time.perf_counter()
        pruned = prune_stage(dense, data, recipe.prune, example_inputs=x, finetune=recipe.finetune, device=self.device)
        val_pruned = self.val(pruned.model, data)
        tuned = finetune_stage(pruned.model, dense, data, recipe.finetune, device=self.device)
        self.save(key, {
            "criterion": recipe.prune.criterion, "val_pruned": val_pruned, "test_pruned": pruned.accuracy,
            "val": self.val(tuned.model, data), "test": tuned.accuracy, "params_ratio": pruned.result.params_ratio,
            "macs_ratio": pruned.result.macs_ratio, "latency_ratio": pruned.result.latency_ratio, "cs_shrunk": tuned.cs,
            "finetune_loss": tuned.history[-1]["train_loss"] if tuned.history else None, "seconds": time.perf_counter() - t0,
        })

    def narrow(self, seed, target, base_params):
        key = f"narrow/{self.tk(target)}/{seed}"
        if key in self.results or self.out_of_time():
            return
        b, data = self.base, self.data(seed)
        x = example_inputs_for(data.info)
        lo, hi = 0.05, b.model.width
        for _ in range(30):  # width whose parameter count matches the target (at most it)
            mid = 0.5 * (lo + hi)
            model = create_model(b.model.name, num_classes=data.info.num_classes, in_channels=data.info.in_channels, width=mid, small_input=b.model.small_input)
            if measure(model, x).params <= target * base_params:
                lo = mid
            else:
                hi = mid
        t0 = time.perf_counter()
        recipe = self.recipe(overrides={"model.width": lo, "premin.steps": 0, "train.epochs": b.train.epochs + b.finetune.epochs, "run.seed": seed})
        model, test, params = self.train_from_scratch(recipe, data)
        self.save(key, {"val": self.val(model, data), "test": test, "width": lo, "params_ratio": params / base_params,
                        "seconds": time.perf_counter() - t0})

    def long_dense(self, seed):
        key = f"dense-long/{seed}"
        if key in self.results or self.out_of_time():
            return
        b, data = self.base, self.data(seed)
        t0 = time.perf_counter()
        recipe = self.recipe(overrides={"premin.steps": 0, "train.epochs": b.train.epochs + b.finetune.epochs, "run.seed": seed})
        model, test, _ = self.train_from_scratch(recipe, data)
        self.save(key, {"val": self.val(model, data), "test": test, "seconds": time.perf_counter() - t0})

    def run(self):
        a = self.args
        self.check_settings()
        for seed in a.seeds:
            dense_a, rng_a = self.dense(seed, premin=True)
            base = self.results[f"dense-A-{seed}"]["params"]
            for target in a.targets:
                for label, sets in self.rows.items():
                    self.prune_finetune(f"A/{label}/{self.tk(target)}/{seed}", dense_a, rng_a, sets, target, seed)
            if a.ablation:
                if "long" in a.ablation_parts:
                    self.long_dense(seed)
                for target in a.targets if "narrow" in a.ablation_parts else ():
                    self.narrow(seed, target, base)
                dense_b = None if self.out_of_time() or not self.b_rows else self.dense(seed, premin=False)
                for target in a.targets:
                    for label, sets in self.b_rows.items():
                        if dense_b is not None:
                            self.prune_finetune(f"B/{label}/{self.tk(target)}/{seed}", *dense_b, sets, target, seed)
        self.table()

    # ------------------------------------------------------------------------------------- output

    def table(self):
        a, r, b = self.args, self.results, self.base
        labels = list(self.rows)

        def stat(keys, field="test"):
            vals = [r[k][field] for k in keys if k in r and r[k].get(field) is not None]
            if not vals:
                return "–"
            return f"{statistics.mean(vals):.2f} ± {statistics.pstdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"

        lines = [f"Every A row is `{self.command()}` (criterion X, target T, seed S).", ""]
        lines += [f"Dense A (pre-min {b.premin.steps} steps + train {b.train.epochs} ep): test {stat([f'dense-A-{s}' for s in a.seeds])}, "
                  f"val {stat([f'dense-A-{s}' for s in a.seeds], 'val')}", ""]
        lines.append("| criterion | " + " | ".join(f"{t:g}: pruned → fine-tuned (test %)" for t in a.targets) + " | " + " | ".join(f"{t:g} val %" for t in a.targets) + " |")
        lines.append("|---|" + "---|" * (2 * len(a.targets)))
        for label in labels:
            cells = [f"{stat([f'A/{label}/{self.tk(t)}/{s}' for s in a.seeds], 'test_pruned')} → **{stat([f'A/{label}/{self.tk(t)}/{s}' for s in a.seeds])}**" for t in a.targets]
            vcells = [stat([f"A/{label}/{self.tk(t)}/{s}" for s in a.seeds], "val") for t in a.targets]
            lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(vcells) + " |")
        # paired: each seed's pruned model against its own dense model (removes the dense models' spread)
        lines += ["", "Paired test-accuracy change against the same seed's dense A model (mean ± std over seeds):", ""]
        lines.append("| criterion | " + " | ".join(f"{t:g}" for t in a.targets) + " |")
        lines.append("|---|" + "---|" * len(a.targets))
        for label in labels:
            cells = []
            for t in a.targets:
                d = [r[f"A/{label}/{self.tk(t)}/{s}"]["test"] - r[f"dense-A-{s}"]["test"] for s in a.seeds if f"A/{label}/{self.tk(t)}/{s}" in r and f"dense-A-{s}" in r]
                cells.append("–" if not d else f"{statistics.mean(d):+.2f} ± {statistics.pstdev(d):.2f}" if len(d) > 1 else f"{d[0]:+.2f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", *self.verdict()]
        lines += ["", *self.paired_table()]
        achieved = {
            t: [(r[k]["params_ratio"], r[k]["macs_ratio"]) for k in r if k.startswith("A/") and k.split("/")[2] == self.tk(t)]
            for t in a.targets
        }
        measured = {t: [r[k]["latency_ratio"] for k in r if k.startswith("A/") and k.split("/")[2] == self.tk(t) and r[k].get("latency_ratio")]
                    for t in a.targets}
        if any(achieved.values()):
            lines.append("")
            lines.append("Achieved (params ratio, MACs ratio) per target: " + ", ".join(
                f"{t:g} → params {min(p for p, _ in v):.4f}–{max(p for p, _ in v):.4f}, MACs {min(m for _, m in v):.3f}–{max(m for _, m in v):.3f}"
                for t, v in achieved.items() if v))
        if any(measured.values()):
            lines.append("Measured latency ratio in the search (at prune.latency_batch, on the run's device): " + ", ".join(
                f"{t:g} → {min(v):.3f}–{max(v):.3f}" for t, v in measured.items() if v))
        if a.ablation:
            lines += ["", "| pipeline | " + " | ".join(f"{t:g} (test %)" for t in a.targets) + " |", "|---|" + "---|" * len(a.targets)]
            rows = [(f"(a) CS pre-min + train + {c}", f"A/{c}") for c in self.b_rows if c != "l1" and c in self.rows]
            rows += [(f"(b) plain train + {c}", f"B/{c}") for c in self.b_rows if c != "l1"]
            if "l1" in self.b_rows:
                rows.append(("(c) plain train + l1", "B/l1"))
            rows.append(("(d) narrow model from scratch, same total epochs", "narrow"))
            for label, prefix in rows:
                lines.append(f"| {label} | " + " | ".join(stat([f"{prefix}/{self.tk(t)}/{s}" for s in a.seeds]) for t in a.targets) + " |")
            lines.append(f"| (e) dense, same total epochs | {stat([f'dense-long/{s}' for s in a.seeds])} (params ratio 1.0) |" + " |" * (len(a.targets) - 1))
        text = "\n".join(lines)
        print("\n" + text)
        atomic_write_text(self.out / ("table.md" if a.target_kind == "params" else f"table-{a.target_kind}.md"), text + "\n")
        self.plot()

    def verdict(self) -> list[str]:
        """Ours against the best other criterion at each target, paired over seeds (a paired t statistic;
        with n seeds it needs |t| above the two-sided 95% critical value to call the two different)."""
        a, r = self.args, self.results
        ours = a.ours
        peers = [label for label in self.rows if not self.recipe(self.rows[label]).prune.criterion.startswith("convsim")]
        out = []
        for t in a.targets:
            def accs(label, t=t):
                return {s: r[f"A/{label}/{self.tk(t)}/{s}"]["test"] for s in a.seeds if f"A/{label}/{self.tk(t)}/{s}" in r}
            mine = accs(ours)
            others = {c: v for c in peers if (v := accs(c))}
            if not mine or not others:
                continue
            best = max(others, key=lambda c: statistics.mean(others[c].values()))
            seeds = sorted(set(mine) & set(others[best]))
            d = [mine[s] - others[best][s] for s in seeds]
            if len(d) < 2:
                continue
            mean, tstat, crit = statistics.mean(d), t_statistic(d), t_critical(len(d))
            word = "better" if tstat > crit else "worse" if tstat < -crit else "tied (not distinguishable)"
            out.append(f"- target {t:g}: {ours} − {best} (the best peer by mean) = {mean:+.2f} points paired over {len(d)} seeds, "
                       f"t = {tstat:+.2f} (|t| > {crit} needed): **{word}**")
        return out

    def paired_table(self) -> list[str]:
        """Every row against ``--ours``, paired by seed, on the validation split (where choices are made)
        and on the test split: mean differences, the paired t statistic on validation and its two-sided
        95% critical value for the number of pairs the cell has."""
        a, r = self.args, self.results
        # (label, key prefix): the grid's rows, then the narrow model from scratch where the ablation ran it
        others = [(label, f"A/{label}") for label in self.rows if label != a.ours]
        if any(k.startswith("narrow/") for k in r):
            others.append(("(d) narrow from scratch", "narrow"))
        if a.ours not in self.rows or not others:
            return []
        out = [f"Each row − {a.ours}, paired by seed (val / test points; t on val against the 95% critical value for "
               "that many pairs: a difference is told only where |t| is above it):", "",
               "| row | " + " | ".join(f"{t:g}" for t in a.targets) + " |", "|---|" + "---|" * len(a.targets)]
        for label, prefix in others:
            cells = []
            for t in a.targets:
                keys = [(f"{prefix}/{self.tk(t)}/{s}", f"A/{a.ours}/{self.tk(t)}/{s}") for s in a.seeds]
                keys = [(k, o) for k, o in keys if k in r and o in r]
                if not keys:
                    cells.append("–")
                    continue
                dv = [r[k]["val"] - r[o]["val"] for k, o in keys]
                dt = [r[k]["test"] - r[o]["test"] for k, o in keys]
                cell = f"{statistics.mean(dv):+.2f} / {statistics.mean(dt):+.2f}"
                if len(dv) > 1:
                    cell += f" (t = {t_statistic(dv):+.1f} vs {t_critical(len(dv))}, {len(dv)} seeds)"
                else:
                    cell += " (1 seed)"
                cells.append(cell)
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        return out

    def plot(self):
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        a, r = self.args, self.results
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for label in a.plot or self.rows:
            xs, ys, es = [], [], []
            for t in a.targets:
                vals = [r[f"A/{label}/{self.tk(t)}/{s}"]["test"] for s in a.seeds if f"A/{label}/{self.tk(t)}/{s}" in r]
                if vals:
                    xs.append(t)
                    ys.append(statistics.mean(vals))
                    es.append(statistics.pstdev(vals) if len(vals) > 1 else 0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label, lw=2.5 if label == a.ours else 1)
        dense = [r[f"dense-A-{s}"]["test"] for s in a.seeds if f"dense-A-{s}" in r]
        if dense:
            ax.axhline(statistics.mean(dense), color="k", ls="--", lw=1, label="dense")
        ax.set_xscale("log")
        ax.set_xticks(a.targets, [f"{t:g}" for t in a.targets])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"{a.target_kind} ratio kept (target)")
        ax.set_ylabel("test top-1 % after fine-tuning")
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(self.out / f"accuracy_vs_{a.target_kind}.png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--model", help="zoo model (its shipped recipe is the base; default: the preset's)")
    for name, key in SHORTCUTS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=float if name == "width" else int, help=f"shortcut for --set {key}=...")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any recipe setting for every unit (repeatable)")
    p.add_argument("--criteria", nargs="*", help=f"registered criteria, one row each (default: {' '.join(CRITERIA)}; "
                                                 "given with none: no grid rows, only the ablation)")
    p.add_argument("--variant", nargs="+", action="append", metavar=("LABEL", "KEY=VALUE"),
                   help="an extra row: a label and its recipe settings, e.g. --variant convsim-s0.5 prune.criterion=convsim "
                        "prune.criterion_options.strength=0.5 (repeatable)")
    p.add_argument("--targets", type=float, nargs="+")
    p.add_argument("--target-kind", choices=["params", "macs", "latency"], default="params",
                   help="what --targets are fractions of: parameters (default), MACs, or latency measured on the "
                        "device (--target-latency; prune.latency_batch, prune.global_pruning and the rest via --set)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--no-ablation", dest="ablation", action="store_false")
    p.add_argument("--ablation-parts", nargs="+", choices=["long", "narrow"], default=["long", "narrow"],
                   help="which of the ablation's models from scratch to train: the dense model for the same total "
                        "epochs (long), the narrow one (narrow); dense B follows --b-criteria")
    p.add_argument("--plot", nargs="+", default=None, help="rows drawn in the plot (default: all)")
    p.add_argument("--b-criteria", nargs="*", default=["convsim-taylor", "l1"],
                   help="criteria applied to dense B (no pre-minimisation); none: the ablation trains no dense B")
    p.add_argument("--ours", default="convsim-taylor", help="the row the verdict compares with the peers")
    p.add_argument("--data-dir", default=None, help="data folder (default: the usual places)")
    p.add_argument("--shard", default=None, help="write results-SHARD.json (parallel processes into one --out)")
    p.add_argument("--time-budget", type=float, default=None, help="start no new unit after this many seconds")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: the recipe's)")
    p.add_argument("--out", default=None)
    p.add_argument("--table-only", action="store_true", help="print the table of what is finished")
    args = p.parse_args(argv)
    if args.target_kind != "params" and args.ablation and not args.table_only:
        p.error("the ablation's narrow model is sized by parameters: add --no-ablation to a --target-kind "
                f"{args.target_kind} run")
    preset = PRESETS[args.preset]
    args.model = args.model or preset["model"]
    args.preset_sets = preset["sets"]
    args.criteria = preset.get("criteria", CRITERIA) if args.criteria is None else args.criteria
    args.targets = args.targets or preset.get("targets", TARGETS)
    args.seeds = args.seeds if args.seeds is not None else preset.get("seeds", [0, 1, 2])
    args.out = args.out or f"bench-out/compare-{args.preset}"
    try:
        bench = Bench(args)
    except convsim_shrink.ConvSimError as exc:
        sys.exit(f"error: {exc}")
    if args.table_only:
        bench.table()
    else:
        bench.run()


if __name__ == "__main__":
    main()
