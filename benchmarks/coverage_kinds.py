"""Architecture coverage, issue 24's kinds: models of our own, one per failure kind users reported, each
through the product (``convsim_shrink.shrink``) on a few seeded synthetic batches.

    python benchmarks/coverage_kinds.py --out bench-out/kinds              # every case
    python benchmarks/coverage_kinds.py --out bench-out/kinds --cases ghost res2net

Each case runs in its own process under a memory cap (``--memory-gb``, RLIMIT_AS) and a time limit
(``--seconds``).  Status: ``shrunk`` (with the params ratio, the layers left alone and the note),
``refused`` (one ConvSimError line, checked against what the case expects), ``timeout``, or ``CRASH``
(any other exception: a bug).  Writes ``OUT/results.json`` and prints a Markdown table.  The timm cases
(real GhostNet and Res2Net) need timm (the test extra).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _models():
    """name -> (what it is, factory, input shape, shrink kwargs, recipe overrides)."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import ChannelAttention, TensorSplitResidual, TinyShuffle  # noqa: E402  (the tests' models)

    def cbr(i, o, k=3, g=1):
        return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    class Res2(nn.Module):  # Res2Net's block: split into 4, a conv per piece fed by the previous piece, concatenated
        def __init__(self, c=32, scale=4):
            super().__init__()
            self.w = c // scale
            self.stem, self.conv1 = cbr(3, c), cbr(c, c, 1)
            self.convs = nn.ModuleList([cbr(self.w, self.w) for _ in range(scale - 1)])
            self.conv3, self.post, self.fc = nn.Conv2d(c, c, 1), cbr(c, 64), nn.Linear(64, 10)

        def forward(self, x):
            x = self.stem(x)
            pieces, outs, sp = torch.split(self.conv1(x), self.w, 1), [], None
            for i, conv in enumerate(self.convs):
                sp = conv(pieces[i] if i == 0 else sp + pieces[i])
                outs.append(sp)
            y = torch.relu(self.conv3(torch.cat([*outs, pieces[-1]], 1)) + x)
            return self.fc(self.post(y).mean((2, 3)))

    class Ghost(nn.Module):  # GhostNet's module: half the maps by a conv, half by a cheap depthwise op, cat, slice
        def __init__(self):
            super().__init__()
            self.stem, self.primary, self.cheap = cbr(3, 32), cbr(32, 16, 1), cbr(16, 16, 3, g=16)
            self.post, self.fc = cbr(30, 64), nn.Linear(64, 10)

        def forward(self, x):
            a = self.primary(self.stem(x))
            return self.fc(self.post(torch.cat([a, self.cheap(a)], 1)[:, :30]).mean((2, 3)))

    class Shuffle(nn.Module):  # conv -> channel shuffle -> conv
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

        def forward(self, x):
            h = torch.relu(self.a(x))
            n, c, hh, ww = h.shape
            h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
            return self.fc(torch.relu(self.b(h)).mean((2, 3)))

    class SharedTwice(nn.Module):  # one conv applied twice
        def __init__(self):
            super().__init__()
            self.stem, self.shared, self.post, self.fc = cbr(3, 32), nn.Conv2d(32, 32, 3, padding=1), cbr(32, 64), nn.Linear(64, 10)

        def forward(self, x):
            h = self.stem(x)
            h = torch.relu(self.shared(torch.relu(self.shared(h))))
            return self.fc(self.post(h).mean((2, 3)))

    def narrow():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 3), nn.ReLU(), nn.Conv2d(10, 10, 3), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 10))

    def wide():
        return nn.Sequential(nn.Conv2d(3, 128, 3), nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 24, 3), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))

    def conv3d():
        return nn.Sequential(nn.Conv3d(3, 16, 3), nn.BatchNorm3d(16), nn.ReLU(), nn.Conv3d(16, 16, 3), nn.ReLU(),
                             nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 10))

    def scripted():
        return torch.jit.script(narrow())

    def timm_model(name):
        def make():
            import timm

            return timm.create_model(name, num_classes=10)
        return make

    img = (3, 32, 32)
    return {
        "narrow": ("every prunable layer at most 10 channels wide", narrow, img, {"target_params": 0.5}, {}),
        "shuffle": ("conv -> channel shuffle -> conv", Shuffle, img, {"target_params": 0.5}, {}),
        "shufflenet-unit": ("ShuffleNetV2 unit (the tests' TinyShuffle)", TinyShuffle, img, {"target_params": 0.5}, {}),
        "res2net": ("Res2Net block: split, chained convs, concatenated", Res2, img, {"target_params": 0.5}, {}),
        "ghost": ("GhostNet module: conv + cheap depthwise, concatenated, sliced", Ghost, img, {"target_params": 0.5}, {}),
        "tensor-split": ("tensor_split of a residual stream, half convolved, added back", TensorSplitResidual, img,
                         {"target_params": 0.5}, {"prune": {"graph_seconds": 10}}),
        "attention": ("Restormer-style channel attention (q, k, v chunked from one conv)", ChannelAttention, img,
                      {"target_params": 0.5}, {"prune": {"graph_seconds": 10}}),
        "shared-conv": ("one conv applied twice", SharedTwice, img, {"target_params": 0.5}, {}),
        "max-layer-ratio": ("128- and 24-channel convs, target 0.02 (limit 0.9 per layer)", wide, img, {"target_params": 0.02}, {}),
        "conv3d": ("Conv3d model, default recipe (channels_last on)", conv3d, (3, 6, 12, 12), {"target_params": 0.5}, {}),
        "torchscript": ("torch.jit.script(model)", scripted, img, {"target_params": 0.5}, {}),
        "timm-ghostnet_050": ("timm ghostnet_050 (real GhostNet)", timm_model("ghostnet_050"), img, {"target_params": 0.5}, {}),
        "timm-res2net50_14w_8s": ("timm res2net50_14w_8s (real Res2Net)", timm_model("res2net50_14w_8s"), img,
                                  {"target_params": 0.5}, {}),
    }


#: the shortest product run: one epoch of training on three batches, no fine-tuning
QUICK = {"premin": {"steps": 1}, "train": {"epochs": 1, "lr": 0.01}, "finetune": {"epochs": 0},
         "prune": {"bn_recalibration": 1, "calibration_batches": 1}, "run": {"quiet": True, "device": "cpu"}}


def run_case(name: str) -> dict:
    """Shrink one case through ``convsim_shrink.shrink``; its row as a dict."""
    import resource

    import torch

    import convsim_shrink
    from convsim_shrink.errors import ConvSimError
    from convsim_shrink.recipe import _deep_merge

    what, make, shape, kwargs, overrides = _models()[name]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, *shape, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    row = {"case": name, "what": what}
    t0 = time.perf_counter()
    try:
        model = make()
        row["params"] = sum(p.numel() for p in model.parameters())
        result = convsim_shrink.shrink(model, batches, batches[:1], num_classes=10, recipe=_deep_merge(QUICK, overrides), **kwargs)
        rep = result.report
        row.update(status="shrunk", params_ratio=rep["params_ratio"], left_alone=[e["layer"] for e in rep["ignored_layers"]
                                                                                if e["rule"] != "output"],
                   notes=rep["notes"])
    except ConvSimError as exc:
        row.update(status="refused", message=str(exc))
    except Exception as exc:  # a bug
        import traceback

        row.update(status="CRASH", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def _child(name: str, memory_gb: float) -> None:
    import resource

    cap = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    print(json.dumps(run_case(name)))


def table(rows: list[dict]) -> str:
    lines = ["| case | what | params | status | params ratio | left alone (beyond outputs) | note or refusal | s | peak MB |",
             "|---|---|---:|---|---:|---|---|---:|---:|"]
    for r in rows:
        notes = [n for n in r.get("notes") or [] if not n.startswith("the dense model is near chance")]  # random data: always
        text = "; ".join(notes) or r.get("message", "")
        ratio = f"{r['params_ratio']:.3f}" if r.get("params_ratio") is not None else ""
        alone = ", ".join(r.get("left_alone") or [])
        lines.append(f"| {r['case']} | {r['what']} | {r.get('params', '')} | {r['status']} | {ratio} | {alone} | "
                     f"{text.replace('|', '/')} | {r.get('seconds', '')} | {r.get('peak_rss_mb', '')} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", nargs="*", default=None)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--memory-gb", type=float, default=6.0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child, args.memory_gb)
        return []
    names = args.cases or list(_models())
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        t0 = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--child", name, "--memory-gb", str(args.memory_gb)],
                                  capture_output=True, text=True, timeout=args.seconds, check=False)
            line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("{")), None)
            row = json.loads(line) if line else {"case": name, "what": _models()[name][0], "status": "CRASH",
                                                  "message": (done.stderr.strip().splitlines() or ["no output"])[-1]}
        except subprocess.TimeoutExpired:
            row = {"case": name, "what": _models()[name][0], "status": "timeout", "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{name}: {row['status']} {row.get('params_ratio', '')} ({row.get('seconds', '')} s)", flush=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
