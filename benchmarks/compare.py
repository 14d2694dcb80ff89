"""Compression quality against the peers, side by side: criteria x targets x seeds, plus the pipeline
ablation. One command, resumable (every finished unit is kept in OUT/results.json and skipped on a
re-run), same data, same dense model per seed, same fine-tuning budget for every criterion.

    python benchmarks/compare.py --preset cpu     # <= 90 min on the 2-core CPU machine
    bash benchmarks/compare_gpu.sh                # GPU preset: full Fashion-MNIST, ResNet18 width 0.5,
                                                  # one process per seed (about 11 min on one H200)

Per seed:
  dense A: CS pre-minimisation + train E epochs (our pipeline's dense model)
  dense B: plain train E epochs (no pre-minimisation)
  grid:    prune A with every criterion to every target, fine-tune F epochs
  (b) B + ours (--b-criteria), (c) B + l1                   (each target, fine-tuned F epochs)
  (d) narrow model (width solved to match the shrunk size) trained from scratch E+F epochs
  (e) dense model trained E+F epochs (the real baseline)
A criterion name with the suffix -global prunes globally (LAMP always does: it is a global criterion).
Model selection never looks at the test set: --val-split images are held out of training and the
validation accuracy is reported next to the test accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import convsim_shrink
from convsim_shrink.data import build_data
from convsim_shrink.engine import accumulate_gradients, atomic_write_bytes, distillation, evaluate, fit, recalibrate_bn, resolve_device, resolve_precision, seed_everything
from convsim_shrink.models import create_model
from convsim_shrink.premin import preminimize
from convsim_shrink.pruning import measure, prune_to_target
from convsim_shrink.ranking import NEEDS_GRADIENTS, ConvSimImportance, make_importance
from convsim_shrink.recipe import DataConfig, FinetuneConfig, PreminConfig, TrainConfig

PRESETS = {
    "cpu": dict(model="resnet18", width=0.25, subset=6000, val_split=2000, epochs=10, finetune_epochs=4, batch_size=128),
    # sized for one 10-minute call on one H100/H200, one process per seed sharing the GPU
    "gpu": dict(model="resnet18", width=0.5, subset=None, val_split=5000, epochs=8, finetune_epochs=4, batch_size=512),
}
CRITERIA = ["convsim-taylor-global", "convsim-global", "convsim-taylor", "convsim", "taylor", "l1", "l2", "fpgm", "lamp", "random"]
TARGETS = [0.5, 0.25, 0.1]


def importance(name: str):
    """A registered criterion, or a variant of ours: convsim-pure (no magnitude), convsim-s<strength>,
    convsim-taylor-s<strength>; any of them with the suffix -global prunes globally."""
    name = name.removesuffix("-global")
    if name == "convsim-pure":
        return ConvSimImportance(strength=1.0, magnitude=False)
    for prefix, magnitude in (("convsim-taylor-s", "taylor"), ("convsim-s", True)):
        if name.startswith(prefix):
            return ConvSimImportance(strength=float(name.removeprefix(prefix)), magnitude=magnitude)
    return make_importance(name)


def needs_gradients(name: str) -> bool:
    return name.removesuffix("-global") in NEEDS_GRADIENTS or name.startswith("convsim-taylor")


def is_global(name: str) -> bool:
    return name.endswith("-global") or name in GLOBAL


#: criteria designed for global (cross-layer) ranking; under local pruning LAMP's per-layer
#: normalisation leaves the L2 order unchanged, so it is run as its authors use it
GLOBAL = {"lamp"}


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        # one results file per shard (parallel processes, e.g. one per seed); the table merges them all
        self.results_file = self.out / (f"results-{args.shard}.json" if args.shard else "results.json")
        self.results = {}
        for f in sorted(self.out.glob("results*.json")):
            self.results.update(json.loads(f.read_text()))
        self.mine = json.loads(self.results_file.read_text()) if self.results_file.is_file() else {}
        self.started = time.perf_counter()
        self.device = resolve_device(args.device)
        self.data = build_data(DataConfig(subset=args.subset, val_split=args.val_split, dir=args.data_dir), batch_size=args.batch_size, seed=0)
        if self.device.type != "cpu":
            for loader in (self.data.train, self.data.val, self.data.test):
                loader.to(self.device)
        self.x = torch.randn(1, 1, 28, 28)
        self.prec = resolve_precision(self.device)
        lr_scale = (args.batch_size / 128) ** 0.5  # square-root scaling from the batch-128 settings
        self.train_cfg = TrainConfig(epochs=args.epochs, lr=0.1 * lr_scale, warmup_epochs=0.5, batch_size=args.batch_size)
        self.ft_cfg = FinetuneConfig(epochs=args.finetune_epochs, lr=args.ft_lr * lr_scale, batch_size=args.batch_size)

    def size(self, model):
        return measure(model, self.x.to(next(model.parameters()).device))

    def out_of_time(self) -> bool:
        return self.args.time_budget is not None and time.perf_counter() - self.started > self.args.time_budget

    def save(self, key, value):
        self.results[key] = value
        self.mine[key] = value
        atomic_write_bytes(self.results_file, json.dumps(self.mine, indent=1).encode())
        print(f"{key}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in value.items()})}", flush=True)

    def accuracies(self, model):
        return {
            "val": evaluate(model, self.data.val, self.prec)["acc"],
            "test": evaluate(model, self.data.test, self.prec)["acc"],
        }

    def model(self, seed, width=None):
        seed_everything(seed)
        return create_model(self.args.model, num_classes=10, in_channels=1, width=width or self.args.width)

    def dense(self, seed, premin: bool):
        name = f"dense-{'A' if premin else 'B'}-{seed}"
        path = self.out / f"{name}.safetensors"
        if path.is_file() and name in self.results:
            return convsim_shrink.load(path).to(self.device)
        model = self.model(seed)
        t0 = time.perf_counter()
        if premin:
            cfg = PreminConfig()
            preminimize(model, steps=cfg.steps, lr=cfg.lr)
        fit(model, self.data.train, self.train_cfg, device=self.device, quiet=True, stage=name)
        convsim_shrink.save(model.cpu(), path)
        model.to(self.device)
        self.save(name, {**self.accuracies(model), "params": self.size(model).params, "seconds": time.perf_counter() - t0})
        return model

    def prune_finetune(self, key, dense, criterion, target, seed):
        if key in self.results or self.out_of_time():
            return
        t0 = time.perf_counter()
        seed_everything(seed)
        source = dense
        if needs_gradients(criterion):
            source = copy.deepcopy(dense)
            accumulate_gradients(source, self.data.train, 4)  # the pipeline's prune.calibration_batches
        x = self.x.to(next(source.parameters()).device)
        result = prune_to_target(source, x, importance(criterion), target_params=target, tolerance=0.01, global_pruning=is_global(criterion))
        pruned = result.model.to(self.device)
        pruned.zero_grad(set_to_none=True)
        recalibrate_bn(pruned, self.data.train, 50, self.prec)
        before = self.accuracies(pruned)
        extra, task_weight = (), 1.0
        if self.args.distill > 0:
            extra, task_weight = (distillation(dense, self.args.distill),), 1.0 - self.args.distill
        fit(pruned, self.data.train, self.ft_cfg, device=self.device, quiet=True, stage=key, extra=extra, task_weight=task_weight)
        after = self.accuracies(pruned)
        self.save(key, {
            "val_pruned": before["val"], "test_pruned": before["test"], "val": after["val"], "test": after["test"],
            "params_ratio": result.params_ratio, "macs_ratio": result.macs_ratio, "seconds": time.perf_counter() - t0,
        })

    def narrow(self, seed, target, base_params):
        key = f"narrow/{target}/{seed}"
        if key in self.results or self.out_of_time():
            return
        lo, hi = 0.05, self.args.width
        for _ in range(30):  # width whose parameter count matches the target (at most it)
            mid = 0.5 * (lo + hi)
            if self.size(create_model(self.args.model, num_classes=10, in_channels=1, width=mid)).params <= target * base_params:
                lo = mid
            else:
                hi = mid
        t0 = time.perf_counter()
        model = self.model(seed, width=lo)
        cfg = self.train_cfg.model_copy(update={"epochs": self.args.epochs + self.args.finetune_epochs})
        fit(model, self.data.train, cfg, device=self.device, quiet=True, stage=key)
        size = self.size(model)
        self.save(key, {**self.accuracies(model), "width": lo, "params_ratio": size.params / base_params, "seconds": time.perf_counter() - t0})

    def long_dense(self, seed):
        key = f"dense-long/{seed}"
        if key in self.results or self.out_of_time():
            return
        t0 = time.perf_counter()
        model = self.model(seed)
        cfg = self.train_cfg.model_copy(update={"epochs": self.args.epochs + self.args.finetune_epochs})
        fit(model, self.data.train, cfg, device=self.device, quiet=True, stage=key)
        self.save(key, {**self.accuracies(model), "seconds": time.perf_counter() - t0})

    def run(self):
        a = self.args
        for seed in a.seeds:
            dense_a = self.dense(seed, premin=True)
            base = self.size(dense_a).params
            for target in a.targets:
                for crit in a.criteria:
                    self.prune_finetune(f"A/{crit}/{target}/{seed}", dense_a, crit, target, seed)
            if a.ablation:
                self.long_dense(seed)
                for target in a.targets:
                    self.narrow(seed, target, base)
                dense_b = None if self.out_of_time() else self.dense(seed, premin=False)
                for target in a.targets:
                    for crit in a.b_criteria:
                        if dense_b is not None:
                            self.prune_finetune(f"B/{crit}/{target}/{seed}", dense_b, crit, target, seed)
        self.table()

    def table(self):
        a, r = self.args, self.results

        def stat(keys, field="test"):
            vals = [r[k][field] for k in keys if k in r]
            if not vals:
                return "–"
            return f"{statistics.mean(vals):.2f} ± {statistics.pstdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"

        lines = [f"Dense A (pre-min + train {a.epochs} ep): test {stat([f'dense-A-{s}' for s in a.seeds])}, "
                 f"val {stat([f'dense-A-{s}' for s in a.seeds], 'val')}", ""]
        lines.append("| criterion | " + " | ".join(f"{t:g}: pruned → fine-tuned (test %)" for t in a.targets) + " | " + " | ".join(f"{t:g} val %" for t in a.targets) + " |")
        lines.append("|---|" + "---|" * (2 * len(a.targets)))
        for crit in a.criteria:
            cells = [f"{stat([f'A/{crit}/{t}/{s}' for s in a.seeds], 'test_pruned')} → **{stat([f'A/{crit}/{t}/{s}' for s in a.seeds])}**" for t in a.targets]
            vcells = [stat([f"A/{crit}/{t}/{s}" for s in a.seeds], "val") for t in a.targets]
            lines.append(f"| {crit} | " + " | ".join(cells) + " | " + " | ".join(vcells) + " |")
        # paired: each seed's pruned model against its own dense model (removes the dense models' spread)
        lines += ["", "Paired test-accuracy change against the same seed's dense A model (mean ± std over seeds):", ""]
        lines.append("| criterion | " + " | ".join(f"{t:g}" for t in a.targets) + " |")
        lines.append("|---|" + "---|" * len(a.targets))
        for crit in a.criteria:
            cells = []
            for t in a.targets:
                d = [r[f"A/{crit}/{t}/{s}"]["test"] - r[f"dense-A-{s}"]["test"] for s in a.seeds if f"A/{crit}/{t}/{s}" in r and f"dense-A-{s}" in r]
                cells.append("–" if not d else f"{statistics.mean(d):+.2f} ± {statistics.pstdev(d):.2f}" if len(d) > 1 else f"{d[0]:+.2f}")
            lines.append(f"| {crit} | " + " | ".join(cells) + " |")
        lines += ["", *self.verdict()]
        achieved = {
            t: [(r[k]["params_ratio"], r[k]["macs_ratio"]) for k in r if k.startswith("A/") and k.split("/")[2] == str(t)]
            for t in a.targets
        }
        if any(achieved.values()):
            lines.append("")
            lines.append("Achieved (params ratio, MACs ratio) per target: " + ", ".join(
                f"{t:g} → params {min(p for p, _ in v):.4f}–{max(p for p, _ in v):.4f}, MACs {min(m for _, m in v):.3f}–{max(m for _, m in v):.3f}"
                for t, v in achieved.items() if v))
        if a.ablation:
            lines += ["", "| pipeline | " + " | ".join(f"{t:g} (test %)" for t in a.targets) + " |", "|---|" + "---|" * len(a.targets)]
            rows = [(f"(a) CS pre-min + train + {crit}", f"A/{crit}") for crit in a.b_criteria if crit != "l1"]
            rows += [(f"(b) plain train + {crit}", f"B/{crit}") for crit in a.b_criteria if crit != "l1"]
            rows += [
                ("(c) plain train + l1", "B/l1"),
                ("(d) narrow model from scratch, same total epochs", "narrow"),
            ]
            for label, prefix in rows:
                lines.append(f"| {label} | " + " | ".join(stat([f"{prefix}/{t}/{s}" for s in a.seeds]) for t in a.targets) + " |")
            lines.append(f"| (e) dense, same total epochs | {stat([f'dense-long/{s}' for s in a.seeds])} (params ratio 1.0) |" + " |" * (len(a.targets) - 1))
        text = "\n".join(lines)
        print("\n" + text)
        atomic_write_bytes(self.out / "table.md", (text + "\n").encode())
        self.plot()

    def verdict(self) -> list[str]:
        """Ours against the best other criterion at each target, paired over seeds (a paired t statistic;
        with n seeds it needs |t| above the two-sided 95% critical value to call the two different)."""
        a, r = self.args, self.results
        ours = a.ours
        t_crit = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}  # df = n - 1
        out = []
        for t in a.targets:
            def accs(crit):
                return {s: r[f"A/{crit}/{t}/{s}"]["test"] for s in a.seeds if f"A/{crit}/{t}/{s}" in r}
            mine = accs(ours)
            others = {c: accs(c) for c in a.criteria if not c.startswith("convsim")}  # the peers
            others = {c: v for c, v in others.items() if v}
            if not mine or not others:
                continue
            best = max(others, key=lambda c: statistics.mean(others[c].values()))
            seeds = sorted(set(mine) & set(others[best]))
            d = [mine[s] - others[best][s] for s in seeds]
            if len(d) < 2:
                continue
            mean, sd = statistics.mean(d), statistics.stdev(d)
            tstat = mean / (sd / len(d) ** 0.5) if sd > 0 else float("inf") * (1 if mean >= 0 else -1)
            crit = t_crit.get(len(d), 2.0)  # beyond 10 seeds about 2
            word = "better" if tstat > crit else "worse" if tstat < -crit else "tied (not distinguishable)"
            out.append(f"- target {t:g}: {ours} − {best} (the best peer by mean) = {mean:+.2f} points paired over {len(d)} seeds, "
                       f"t = {tstat:+.2f} (|t| > {crit} needed): **{word}**")
        return out

    def plot(self):
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        a, r = self.args, self.results
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for crit in a.plot or a.criteria:
            xs, ys, es = [], [], []
            for t in a.targets:
                vals = [r[f"A/{crit}/{t}/{s}"]["test"] for s in a.seeds if f"A/{crit}/{t}/{s}" in r]
                if vals:
                    xs.append(t)
                    ys.append(statistics.mean(vals))
                    es.append(statistics.pstdev(vals) if len(vals) > 1 else 0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=crit, lw=2.5 if crit == a.ours else 1)
        dense = [r[f"dense-A-{s}"]["test"] for s in a.seeds if f"dense-A-{s}" in r]
        if dense:
            ax.axhline(statistics.mean(dense), color="k", ls="--", lw=1, label="dense")
        ax.set_xscale("log")
        ax.set_xticks(a.targets, [f"{t:g}" for t in a.targets])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("parameter ratio kept")
        ax.set_ylabel("test top-1 % after fine-tuning")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.out / "accuracy_vs_params.png", dpi=110)
        plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--model")
    p.add_argument("--width", type=float)
    p.add_argument("--subset", type=int)
    p.add_argument("--val-split", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--criteria", nargs="+", default=CRITERIA)
    p.add_argument("--targets", type=float, nargs="+", default=TARGETS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-ablation", dest="ablation", action="store_false")
    p.add_argument("--plot", nargs="+", default=None, help="criteria drawn in the plot (default: all)")
    p.add_argument("--b-criteria", nargs="+", default=["convsim-taylor-global", "l1"],
                   help="criteria applied to dense B (no pre-minimisation)")
    p.add_argument("--ours", default="convsim-taylor-global", help="the criterion the verdict compares with the peers")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--ft-lr", type=float, default=0.02, help="fine-tuning learning rate at batch 128 (scaled by sqrt(batch / 128))")
    p.add_argument("--distill", type=float, default=0.0, help="weight of distillation from the dense model in fine-tuning")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the usual places)")
    p.add_argument("--shard", default=None, help="write results-SHARD.json (parallel processes into one --out)")
    p.add_argument("--time-budget", type=float, default=None, help="start no new unit after this many seconds")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    p.add_argument("--table-only", action="store_true", help="print the table of what is finished")
    args = p.parse_args()
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.out = args.out or f"bench-out/compare-{args.preset}"
    bench = Bench(args)
    if args.table_only:
        bench.table()
    else:
        bench.run()


if __name__ == "__main__":
    main()
