"""The engine against the limit (issue 26), side by side in one process, the variants taking one step each in turn:

1. images/s of the product's training loop (``train_one_epoch``, with the progress bar and every check
   it makes) against a bare PyTorch loop (forward, cross-entropy, backward, optimizer step) on the same
   model, batch, precision, memory format, optimizer and in-memory batches: ResNet18/0.25 (3x3 stem) at
   28 px, the main job's model, and torchvision's resnet18 (width 1) at 224 px;
2. the main job's training step with the pruning-aware regulariser (``train.sparsity``; vectorised, and
   torch-pruning's own per-group loop) against the same step without it, and the regulariser's own time
   per call;
3. a fine-tuning step with distillation from the dense model (the product's ``distillation`` term, and
   the way it was before issue 26: teacher in fp32, contiguous, under ``no_grad``) against the same
   pruned model's plain step;
4. what an epoch of the main job is made of: training steps, data loading (the real Fashion-MNIST
   loader, augmentation included) and one evaluation of the test set.

    OMP_NUM_THREADS=1 python benchmarks/bench_loop.py [--steps 30] [--steps-224 8] [--no-224] [--clock thread|wall]

Each variant's loop runs in its own thread and takes its next step only when the others have taken
theirs, so step i of every variant ran under the same load; a ratio is the median over the paired steps
(the middle half of the paired ratios in brackets).  With one thread the default clock is the loop
thread's CPU time, which a shared machine inflates less than the elapsed time; with more threads use
``--clock wall``.  Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import threading
import time

import torch
import torch.nn.functional as F
import torch_pruning as tp

from convsim_shrink.models import create_model
from convsim_shrink.models.adapt import logits_of
from convsim_shrink.prune.pruning import group_sparsity_regularizer
from convsim_shrink.prune.safety import plan_ignored_layers
from convsim_shrink.prune.search import prune_to_target
from convsim_shrink.recipe import FinetuneConfig, TrainConfig
from convsim_shrink.train import (
    cpu_has_fast_bf16,
    distillation,
    evaluate,
    make_optimizer,
    resolve_precision,
    set_memory_format,
    train_one_epoch,
)
from convsim_shrink.train.optim import Schedule
from convsim_shrink.train.progress import make_progress


class Batches:
    """``n`` steps over a few fixed in-memory batches (contiguous, as the product's loader yields them)."""

    def __init__(self, n, batch, size, channels, classes=10, distinct=2):
        g = torch.Generator().manual_seed(0)
        self.xs = [torch.randn(batch, channels, size, size, generator=g) for _ in range(distinct)]
        self.ys = [torch.randint(0, classes, (batch,), generator=g) for _ in range(distinct)]
        self.n = n

    def __iter__(self):
        for i in range(self.n):
            yield self.xs[i % len(self.xs)], self.ys[i % len(self.ys)]

    def __len__(self):
        return self.n


def bare_loop(model, batches, optimizer, prec):
    """The limit: what any PyTorch user writes, in the engine's precision and memory format."""
    model.train()
    for x, y in batches:
        if prec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with prec.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def engine_loop(model, batches, optimizer, prec, extra=(), after_backward=None, task_weight=1.0):
    with make_progress(False) as progress:  # as fit() shows it: live on a terminal, off in a pipe
        task = progress.add_task("bench", total=len(batches), info="")
        train_one_epoch(model, batches, optimizer, Schedule(0.01, 10_000), prec=prec, extra=extra, after_backward=after_backward,
                        task_weight=task_weight, progress=progress, task=task)


#: the clock: "thread" (CPU time of the thread running the loop: on a shared machine it counts the work
#: done, not the time spent waiting for a core; one-thread runs only) or "wall"
CLOCK = {"thread": time.thread_time, "wall": time.perf_counter}
clock = time.thread_time


class _Turns:
    """A loader that hands out its next batch only when told to (``go``) and times each step: from handing
    out a batch to being asked for the next one, i.e. everything the loop does for that batch."""

    def __init__(self, batches):
        self.batches, self.go, self.done, self.times = batches, threading.Event(), threading.Event(), []

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for x, y in self.batches:
            self.go.wait()
            self.go.clear()
            t0 = clock()
            yield x, y
            self.times.append(clock() - t0)
            self.done.set()


def lockstep(variants: dict, batches, steps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per step of each variant, the variants taking one step each in turn (the order reversed every
    other step), so that step ``i`` of every variant ran under the same load.  ``variants``: name ->
    ``loop(loader)`` that runs one epoch over ``loader``; each runs in its own thread, one at a time."""
    loaders = {k: _Turns(batches(warmup + steps)) for k in variants}
    failed = []

    def run(fn, loader):
        try:
            fn(loader)
        except Exception as exc:  # noqa: BLE001 - handed to the coordinator, which raises it
            failed.append(exc)
            loader.done.set()

    threads = [threading.Thread(target=run, args=(fn, loaders[k]), daemon=True) for k, fn in variants.items()]
    for t in threads:
        t.start()
    order = list(variants)
    for i in range(warmup + steps):
        for k in order if i % 2 == 0 else order[::-1]:
            loaders[k].go.set()
            loaders[k].done.wait()
            loaders[k].done.clear()
            if failed:
                raise failed[0]
    for t in threads:
        t.join()
    return {k: v.times[warmup:] for k, v in loaders.items()}


def ratio(times, a, b) -> float:
    """Median over paired steps of time[a] / time[b]."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def spread(times, a, b) -> str:
    """The middle half (25th to 75th percentile) of the paired ratios time[a] / time[b], as text."""
    r = sorted(x / y for x, y in zip(times[a], times[b]))
    return f"{r[len(r) // 4]:.2f}–{r[(3 * len(r)) // 4]:.2f}"


def per_step(times, k) -> float:
    return statistics.median(times[k])


def prepared(model, prec):
    model = copy.deepcopy(model)
    if prec.channels_last:
        set_memory_format(model, True)
    return model


def engine_vs_bare(name, model, batch, size, channels, steps, prec):
    cfg = TrainConfig()
    models = {k: prepared(model, prec) for k in ("bare", "engine")}
    opts = {k: make_optimizer(m, cfg) for k, m in models.items()}
    t = lockstep({"bare": lambda b: bare_loop(models["bare"], b, opts["bare"], prec),
                  "engine": lambda b: engine_loop(models["engine"], b, opts["engine"], prec)},
                 lambda n: Batches(n, batch, size, channels), steps)
    eng, bare = per_step(t, "engine"), per_step(t, "bare")
    r = ratio(t, "bare", "engine")
    print(f"| {name} | {batch} | {bare:.3f} | {batch / bare:.0f} | {eng:.3f} | {batch / eng:.0f} | **{r:.3f}** ({spread(t, 'bare', 'engine')}) |", flush=True)
    return r


def main_job_parts(args, prec):
    torch.manual_seed(0)
    dense = create_model("resnet18", num_classes=10, in_channels=1, width=0.25, small_input=True)
    x1 = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    plan = plan_ignored_layers(dense, x1)
    with_reg = None
    if args.only != "distillation":
        with_reg = regulariser_part(dense, plan, x1, prec, args.steps)
    distillation_part(args, dense, plan, x1, prec)
    if args.only != "distillation":
        epoch_part(args, dense, prec, with_reg)


def regulariser_part(dense, plan, x1, prec, steps) -> float:
    """The main job's training step with the pruning-aware regulariser against the step without it; returns
    the step's seconds with it."""
    cfg = TrainConfig()
    models = {k: prepared(dense, prec) for k in ("plain", "vectorised", "library")}
    opts = {k: make_optimizer(m, cfg) for k, m in models.items()}
    regs = {
        "vectorised": group_sparsity_regularizer(models["vectorised"], x1, 5e-5, ignored_layers=_same_layers(plan.layers, dense, models["vectorised"])),
        "library": group_sparsity_regularizer(models["library"], x1, 5e-5, ignored_layers=_same_layers(plan.layers, dense, models["library"]), vectorised=False),
    }

    t = lockstep({k: (lambda b, k=k: engine_loop(models[k], b, opts[k], prec, after_backward=regs.get(k))) for k in models},
                 lambda n: Batches(n, 128, 28, 1), steps)
    calls = {k: [] for k in regs}  # the regulariser's own time per call, alternated
    for _ in range(steps):
        for k, reg in regs.items():
            t0 = clock()
            reg()
            calls[k].append(clock() - t0)
    plain, with_reg = per_step(t, "plain"), per_step(t, "vectorised")
    print("\n| main job's training step (batch 128) | s / step | vs without (middle half) | regulariser call alone | share of the step |\n|---|---|---|---|---|")
    print(f"| without the regulariser | {plain:.3f} | 1.000 | | |")
    for k in ("vectorised", "library"):
        c = statistics.median(calls[k])
        print(f"| with it, {k} | {per_step(t, k):.3f} | {ratio(t, k, 'plain'):.3f} ({spread(t, k, 'plain')}) | {1000 * c:.1f} ms | "
              f"**{100 * c / per_step(t, k):.1f}%** |", flush=True)
    return with_reg


def distillation_part(args, dense, plan, x1, prec):
    """A fine-tuning step with distillation against the plain step: the pruned model (half the parameters,
    as the main recipe) taught by the dense one, every step and (``finetune.distill_every``) every 2nd and
    4th step; those rows are ratios of the summed step times over a multiple of 4 steps."""
    steps = 4 * -(-args.steps // 4)
    dense.eval()
    pruned = prune_to_target(dense, x1, tp.importance.GroupMagnitudeImportance(p=2), target_params=0.5, round_to=8,
                             global_pruning=True, ignored_layers=plan.layers, warn=False).model
    fcfg = FinetuneConfig()
    students = {k: prepared(pruned, prec) for k in ("plain", "kd", "kd before", "kd every 2", "kd every 4")}
    fopts = {k: make_optimizer(m, fcfg) for k, m in students.items()}
    teacher = copy.deepcopy(dense).eval()
    terms = {"kd": (distillation(copy.deepcopy(teacher), fcfg.distill, fcfg.temperature, prec=prec),),
             "kd before": (_distillation_before(copy.deepcopy(teacher), fcfg.distill, fcfg.temperature),)}
    for k in (2, 4):  # the warm-up's 2 steps come first: the timed steps hold steps // k teacher calls
        terms[f"kd every {k}"] = (distillation(copy.deepcopy(teacher), fcfg.distill, fcfg.temperature, prec=prec, every=k),)

    fwd_teacher = prepared(teacher, prec)

    def teacher_forward(loader):  # the least distillation can add: the dense model's forward pass
        for x, _ in loader:
            with torch.inference_mode(), prec.autocast():
                fwd_teacher(x.contiguous(memory_format=torch.channels_last) if prec.channels_last else x)

    loops = {k: (lambda b, k=k: engine_loop(students[k], b, fopts[k], prec, extra=terms.get(k, ()),
                                            task_weight=1 - fcfg.distill if k != "plain" else 1.0)) for k in students}
    t = lockstep({**loops, "teacher forward": teacher_forward}, lambda n: Batches(n, 128, 28, 1), steps)
    print("\n| fine-tuning step (pruned to 0.5 params, batch 128) | s / step | vs the plain step |\n|---|---|---|")
    print(f"| plain (no distillation) | {per_step(t, 'plain'):.3f} | 1.000 |")
    print(f"| distillation, teacher as before (fp32, contiguous, no_grad) | {per_step(t, 'kd before'):.3f} | {ratio(t, 'kd before', 'plain'):.3f} ({spread(t, 'kd before', 'plain')}) |")
    print(f"| distillation, the product's term now | {per_step(t, 'kd'):.3f} | **{ratio(t, 'kd', 'plain'):.3f}** ({spread(t, 'kd', 'plain')}) |")
    print(f"| (the dense teacher's forward pass alone, inference mode) | {per_step(t, 'teacher forward'):.3f} | "
          f"{ratio(t, 'teacher forward', 'plain'):.3f} |", flush=True)
    for k in (2, 4):
        name = f"kd every {k}"
        print(f"| distillation on one step in {k} (`finetune.distill_every={k}`; mean step) | {statistics.mean(t[name]):.3f} | "
              f"**{sum(t[name]) / sum(t['plain']):.3f}** (sums over {steps} steps) |", flush=True)


def epoch_part(args, dense, prec, with_reg):
    """What an epoch of the main job is made of: training steps, data loading, one test evaluation."""
    if args.no_data:
        return
    from convsim_shrink.data import build_data
    from convsim_shrink.recipe import DataConfig

    data = build_data(DataConfig(name="fashion-mnist"), batch_size=128)
    t0 = clock()
    n = sum(1 for _ in data.train)
    load = clock() - t0
    model = prepared(dense, prec)
    t0 = clock()
    evaluate(model, data.test, prec)
    ev = clock() - t0  # (evaluation reads its batches from the loader too)
    train = with_reg * n
    total = train + load + ev
    print(f"\n| one epoch of the main job's training ({n} steps) | seconds | share |\n|---|---|---|")
    print(f"| training steps (regulariser included; measured above × {n}) | {train:.1f} | {100 * train / total:.1f}% |")
    print(f"| data loading (the Fashion-MNIST loader, augmentation included) | {load:.1f} | {100 * load / total:.1f}% |")
    print(f"| one evaluation of the test set ({data.test.num_samples} images) | {ev:.1f} | {100 * ev / total:.1f}% |", flush=True)


def _same_layers(layers, src, dst):
    """``layers`` of ``src`` as the same-named modules of its copy ``dst``."""
    names = {id(m): n for n, m in src.named_modules()}
    by_name = dict(dst.named_modules())
    return [by_name[names[id(m)]] for m in layers if id(m) in names]


def _distillation_before(teacher, weight, temperature):
    """The distillation term as it was before issue 26: the teacher in fp32, contiguous, under no_grad."""
    teacher.eval()

    def term(model, x, y, logits):
        with torch.no_grad():
            t_logits = logits_of(teacher(x)).float()
        t = temperature
        kl = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(t_logits / t, 1), log_target=True, reduction="batchmean")
        return weight * t * t * kl

    term.__name__ = "kd"
    return term


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant at 28 px (after 2 warm-up steps)")
    p.add_argument("--steps-224", type=int, default=8, help="timed steps per variant at 224 px")
    p.add_argument("--batch-224", type=int, default=16)
    p.add_argument("--no-224", action="store_true")
    p.add_argument("--no-data", action="store_true", help="skip the epoch breakdown (needs Fashion-MNIST)")
    p.add_argument("--clock", choices=sorted(CLOCK), default="thread",
                   help="thread: CPU time of the loop's thread (default; one-thread runs); wall: elapsed time (any thread count)")
    p.add_argument("--only", choices=["engine", "parts", "distillation"], help="run one half, or only the distillation rows")
    args = p.parse_args()
    global clock
    clock = CLOCK[args.clock]
    prec = resolve_precision(torch.device("cpu"), "auto", None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), native bf16: {cpu_has_fast_bf16()}, "
          f"engine precision: {prec.describe()}, clock: {args.clock}\n")
    if args.only in ("parts", "distillation"):
        return main_job_parts(args, prec)
    print("| model | batch | bare loop s / step | bare img/s | engine s / step | engine img/s | engine / bare (img/s; middle half) |\n|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    engine_vs_bare("ResNet18/0.25, 28 px (main job)", create_model("resnet18", num_classes=10, in_channels=1, width=0.25, small_input=True),
                   128, 28, 1, args.steps, prec)
    if not args.no_224:
        import torchvision

        torch.manual_seed(0)
        engine_vs_bare("torchvision resnet18, 224 px", torchvision.models.resnet18(num_classes=10), args.batch_224, 224, 3,
                       args.steps_224, prec)
    if args.only != "engine":
        main_job_parts(args, prec)


if __name__ == "__main__":
    main()
