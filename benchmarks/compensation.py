"""Compensated pruning against dropping, paired by seed: configurations x targets x fine-tuning budgets,
every unit run by the product's own stage functions on compare.py's dense models.

    python benchmarks/compensation.py --preset main --out bench-out/compare-main            # the main job's models
    python benchmarks/compensation.py --preset cpu --model vgg11_bn --out bench-out/comp-vgg  # a second architecture

A unit is what the command line gives for

    convsim-shrink MODEL --criterion C --target-params T --seed S --finetune-epochs E --set prune.compensate=X ...

with the preset's settings (compare.py's presets), on the seed's dense model, which compare.py trains once
and keeps in OUT (this script trains it the same way when it is missing, so both scripts share OUT).  Each
(configuration, target, seed) is pruned once; its pruned model is kept in OUT and every fine-tuning budget
starts from a copy of it, so the budgets differ only in fine-tuning.  Budget 0 is the pruned model itself
(after BN re-estimation); the steps before it (channels dropped, compensated) are recorded on the
validation split.  Work runs cheapest first (every prune, then the 1-epoch budgets, then the longer ones),
so a time-limited run leaves the most complete table.  Resumable: finished units are kept in
OUT/results-compensation.json and skipped.  Choices read the validation split; test is reported beside.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import convsim_shrink

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import PRESETS, SHORTCUTS, Bench
from pair import t_critical, t_statistic

from convsim_shrink.pipeline.stages import (
    example_inputs_for,
    finetune_stage,
    prune_stage,
)

#: label -> recipe settings of the prune stage
CONFIGS = {
    "default": ["prune.criterion=convsim-taylor", "prune.compensate=false"],
    "default+comp": ["prune.criterion=convsim-taylor", "prune.compensate=true"],
    "lamp": ["prune.criterion=lamp", "prune.compensate=false"],
    "lamp+comp": ["prune.criterion=lamp", "prune.compensate=true"],
    "residual+comp": ["prune.criterion=residual", "prune.compensate=true"],
}


class CompensationBench(Bench):
    def __init__(self, args):
        variants = {label: sets for label, *sets in args.variant or []}
        args.criteria, args.variant, args.b_criteria = [], None, []
        args.shard = f"compensation-{args.shard}" if args.shard else "compensation"
        super().__init__(args)
        self.configs = {k: CONFIGS[k] for k in args.configs}
        self.configs.update(variants)
        for sets in self.configs.values():
            self.recipe(sets)  # bad settings fail before any work

    def key(self, label, target, seed, epochs) -> str:
        return f"comp/{label}/{target:g}/{seed}/ft{epochs}"

    def pruned(self, label, target, seed, dense, rng):
        """The unit's pruned model (pruned once, kept in OUT) and the random state after pruning."""
        path = self.out / f"pruned-{label}-{target:g}-{seed}.safetensors"
        key0 = self.key(label, target, seed, 0)
        if path.is_file() and key0 in self.results:
            return convsim_shrink.load(path).to(self.device), torch.frombuffer(
                bytearray((path.with_suffix(".rng")).read_bytes()), dtype=torch.uint8).clone()
        recipe = self.recipe(self.configs[label], {f"prune.target_{self.args.target_kind}": target, "run.seed": seed})
        data = self.data(seed)
        x = example_inputs_for(data.info)
        torch.set_rng_state(rng)
        t0 = time.perf_counter()
        out = prune_stage(dense, data, recipe.prune, example_inputs=x, finetune=recipe.finetune, device=self.device)
        seconds = time.perf_counter() - t0
        after = torch.get_rng_state()
        convsim_shrink.save(out.model.cpu(), path, input_shape=tuple(x.shape[1:]))
        path.with_suffix(".rng").write_bytes(after.numpy().tobytes())
        out.model.to(self.device)
        self.save(key0, {
            "val": self.val(out.model, data), "test": out.accuracy, "steps": out.steps, "steps_split": out.steps_split,
            "params_ratio": out.result.params_ratio, "macs_ratio": out.result.macs_ratio, "prune_seconds": seconds,
            "compensation": out.compensation.summary() if out.compensation else None,
        })
        return out.model, after

    def finetune(self, label, target, seed, epochs, dense):
        key = self.key(label, target, seed, epochs)
        if key in self.results or self.out_of_time():
            return
        model, rng = self.pruned(label, target, seed, dense, self._rng[seed])
        recipe = self.recipe(self.configs[label], {"finetune.epochs": epochs, "run.seed": seed})
        data = self.data(seed)
        torch.set_rng_state(rng)
        t0 = time.perf_counter()
        tuned = finetune_stage(copy.deepcopy(model), dense, data, recipe.finetune, device=self.device)
        self.save(key, {"val": self.val(tuned.model, data), "test": tuned.accuracy, "seconds": time.perf_counter() - t0})

    def run(self):
        a = self.args
        self.check_settings()
        self._rng, denses = {}, {}
        for seed in a.seeds:
            denses[seed], self._rng[seed] = self.dense(seed, premin=True)
        for seed in a.seeds:  # phase 1: every prune (budget 0)
            for target in a.targets:
                for label in self.configs:
                    if not self.out_of_time():
                        self.pruned(label, target, seed, denses[seed], self._rng[seed])
        for epochs in sorted(e for e in a.budgets if e > 0):  # then the budgets, cheapest first
            for seed in a.seeds:
                for target in a.targets:
                    for label in self.configs:
                        self.finetune(label, target, seed, epochs, denses[seed])
        self.table()

    def table(self):
        a = self.args
        lines = [f"dense models and settings: {self.command().replace('--criterion X ', '')}", ""]
        for epochs in sorted({0, *a.budgets}):
            lines.append(f"fine-tuning epochs {epochs}: val / test top-1 %, mean over seeds; paired difference "
                         f"to 'default' (t on val, 95% critical value by seeds)")
            for target in a.targets:
                base = {s: self.results.get(self.key("default", target, s, epochs)) for s in a.seeds}
                dense = {s: self.results.get(f"dense-A-{s}") for s in a.seeds}
                for label in self.configs:
                    rows = {s: self.results.get(self.key(label, target, s, epochs)) for s in a.seeds}
                    done = [s for s, r in rows.items() if r]
                    if not done:
                        continue
                    val = statistics.mean(rows[s]["val"] for s in done)
                    test = statistics.mean(rows[s]["test"] for s in done)
                    cells = [f"  {target:<5g} {label:<14} n={len(done)} val {val:6.2f} test {test:6.2f}"]
                    dd = [rows[s]["val"] - dense[s]["val"] for s in done if dense.get(s)]
                    if dd:
                        cells.append(f"vs dense val {statistics.mean(dd):+6.2f}")
                    if epochs == 0:
                        steps = [rows[s].get("steps", {}) for s in done]
                        for name in ("dropped", "compensated"):
                            v = [st[name] for st in steps if name in st]
                            if v:
                                cells.append(f"{name} {statistics.mean(v):6.2f}")
                    pairs = [s for s in done if base.get(s)]
                    if label != "default" and pairs:
                        dv = [rows[s]["val"] - base[s]["val"] for s in pairs]
                        dt = [rows[s]["test"] - base[s]["test"] for s in pairs]
                        t = t_statistic(dv)
                        cells.append(f"vs default {statistics.mean(dv):+6.2f} / {statistics.mean(dt):+6.2f}"
                                     + (f" (t {t:.1f}, crit {t_critical(len(dv)):.2f})" if t is not None else ""))
                    lines.append("  ".join(cells))
            lines.append("")
        text = "\n".join(lines)
        print(text)
        (self.out / "compensation.md").write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="main")
    p.add_argument("--model", help="zoo model (default: the preset's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any recipe setting for every unit (repeatable)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--variant", nargs="+", action="append", metavar=("LABEL", "KEY=VALUE"),
                   help="an extra configuration: a label and its prune.* settings, e.g. --variant ridge1e-2 "
                        "prune.compensation_ridge=0.01 (repeatable)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 1],
                   help="fine-tuning budgets (0 = the pruned model; add the recipe's, e.g. 4, for the full budget)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--time-budget", type=float, default=None, help="start no new unit after this many seconds")
    p.add_argument("--shard", default=None, help="write results-compensation-SHARD.json (parallel processes into one --out)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.model = args.model or preset["model"]
    args.preset_sets = preset["sets"]
    args.target_kind = "params"
    args.out = args.out or f"bench-out/compare-{args.preset}"
    for name in SHORTCUTS:  # compare.py's shortcuts are not options here: the preset and --set give every setting
        setattr(args, name, None)
    bench = CompensationBench(args)
    if args.table_only:
        bench.table()
    else:
        bench.run()


if __name__ == "__main__":
    main()
