"""Paired comparison of two rows of compare.py results, possibly from two OUT folders (a row whose dense
models were trained with other settings, e.g. ``--set train.cs_beta=0.001``, lives in its own OUT).

    python benchmarks/pair.py bench-out/compare-cpu-beta1e-3:convsim-taylor bench-out/compare-cpu:convsim-taylor \
        --targets 0.25 0.1

A row is ``OUT:LABEL``: a grid row's label (``A/LABEL/T/SEED``), ``narrow`` (the narrow model from scratch,
``narrow/T/SEED``) or ``dense`` (``dense-A-SEED``; the target is ignored).  For every target it prints
the mean difference first − second over the seeds both have, on validation and test, and the paired t
statistic on validation against its two-sided 95% critical value (choices are read on validation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

#: two-sided 95% critical values of Student's t for n paired seeds (df = n - 1); beyond 10 seeds about 2
T_CRIT = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}


def t_critical(n: int) -> float:
    """The two-sided 95% critical value of the paired t statistic over ``n`` pairs (about 2 beyond 10)."""
    return T_CRIT.get(n, 2.0)


def t_statistic(diffs: list[float]) -> float | None:
    """Paired t statistic mean / (sample sd / sqrt n) of per-seed differences; None for fewer than 2.
    All differences equal: 0 when they are 0, otherwise ±infinity (a constant nonzero difference)."""
    if len(diffs) < 2:
        return None
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    if sd > 0:
        return mean / (sd / len(diffs) ** 0.5)
    return 0.0 if mean == 0 else float("inf") if mean > 0 else float("-inf")


def load(out: Path) -> dict:
    """Every results*.json of a compare.py OUT, merged."""
    files = sorted(out.glob("results*.json"))
    if not files:
        sys.exit(f"error: {out} holds no results*.json; give a compare.py --out folder")
    results = {}
    for f in files:
        results.update(json.loads(f.read_text()))
    return results


def key(label: str, target: float, seed: int) -> str:
    if label == "dense":
        return f"dense-A-{seed}"
    if label == "narrow":
        return f"narrow/{target:g}/{seed}"
    return f"A/{label}/{target:g}/{seed}"


def paired(first: dict, second: dict) -> dict | None:
    """{"n", "val", "test", "t"} for the seeds both rows have (``first``/``second``: seed -> unit), or None."""
    seeds = sorted(set(first) & set(second))
    if not seeds:
        return None
    dv = [first[s]["val"] - second[s]["val"] for s in seeds]
    dt = [first[s]["test"] - second[s]["test"] for s in seeds]
    return {"n": len(seeds), "val": statistics.mean(dv), "test": statistics.mean(dt), "t": t_statistic(dv)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", help="OUT:LABEL")
    p.add_argument("second", help="OUT:LABEL")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    a = p.parse_args(argv)
    rows = []
    for spec in (a.first, a.second):
        out, sep, label = spec.rpartition(":")
        if not sep or not out or not label:
            sys.exit(f"error: {spec!r} is not OUT:LABEL (e.g. bench-out/compare-cpu:lamp)")
        rows.append((load(Path(out)), label))
    print(f"{a.first} − {a.second}, paired by seed (val / test points; t on val):")
    for target in a.targets:
        units = [{s: r[k] for s in a.seeds if (k := key(label, target, s)) in r} for r, label in rows]
        d = paired(*units)
        if d is None:
            print(f"  {target:g}: no seed in both")
            continue
        t = "" if d["t"] is None else f", t = {d['t']:+.1f} vs {t_critical(d['n'])}"
        print(f"  {target:g}: {d['val']:+.2f} / {d['test']:+.2f} ({d['n']} seeds{t})")


if __name__ == "__main__":
    main()
