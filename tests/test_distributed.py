"""Several processes: sharded loaders (in one process), and two processes over gloo on the CPU started
with ``torch.multiprocessing`` exactly as torchrun would set them up (RANK, WORLD_SIZE, MASTER_ADDR...).

The two-process tests share two spawns: one trains and prunes a model without batch norm, reads an image
folder and fails a preflight on one rank; the other (``slow``: the whole Runner end to end) runs a
pipeline and resumes it.  About 15 s together on two idle cores.

Tolerance of "a 2-process run matches a 1-process run with the same global batch": the parameters
after 8 SGD steps agree to 1e-4 of the largest parameter.  Both runs see the same images, the same
augmentations and the same learning rates; what differs is only the order of floating-point sums (the
gradient is averaged over two half-batches instead of computed on one batch), about 1e-7 relative per
step in fp32.  A wrong reduction (sum instead of mean, or no synchronisation) differs by more than 1e-2.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from convsim_shrink.data import INFO, DataBundle, FolderLoader, TensorLoader, build_data, load_arrays
from convsim_shrink.errors import ConfigError
from convsim_shrink.launch import strip_option
from convsim_shrink.recipe import resolve
from convsim_shrink.train import distributed

from helpers import image_folder, truncate

PIPELINE = [
    "model.name=simple_cnn", "model.width=0.25", "data.subset=256", "data.test_subset=101", "premin.steps=3",
    "train.epochs=1", "train.batch_size=32", "train.precision=fp32", "finetune.epochs=1", "finetune.precision=fp32",
    "prune.calibration_batches=2", "prune.bn_recalibration=2", "prune.round_to=null", "prune.latency_batch=4", "export.formats=[convsim]",
    "run.quiet=true", "run.device=cpu",
]


# ------------------------------------------------------------------------- in one process


def _fashion(n: int = 96):
    x, y = load_arrays("fashion-mnist", None, "train")
    return x[:n], y[:n]


def test_training_shards_together_are_the_single_process_batches(fashion_dir):
    x, y = _fashion()
    one = TensorLoader(x, y, INFO["fashion-mnist"], batch_size=16, train=True, seed=3)
    two = [TensorLoader(x, y, INFO["fashion-mnist"], batch_size=8, train=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        for loader in (one, *two):
            loader.set_epoch(epoch)
        assert len(one) == len(two[0]) == len(two[1]) == 6
        for (xa, ya), (x0, y0), (x1, y1) in zip(one, *two):
            # rank r holds the images r, r+2, r+4... of the global batch, with the same augmentation
            assert torch.equal(ya[0::2], y0) and torch.equal(ya[1::2], y1)
            assert torch.equal(xa[0::2], x0) and torch.equal(xa[1::2], x1)


def test_training_order_differs_by_epoch_and_agrees_across_ranks():
    n = 50
    orders = {}
    for epoch in (0, 1):
        for r in (0, 1):
            loader = FolderLoader(list(range(n)), batch_size=5, train=True, seed=1, rank=r, world_size=2)
            loader.set_epoch(epoch)
            orders[epoch, r] = loader._order()
    for epoch in (0, 1):
        a, b = orders[epoch, 0], orders[epoch, 1]
        assert len(a) == len(b) == 25 and not set(a) & set(b) and set(a) | set(b) == set(range(n))
    assert orders[0, 0] != orders[1, 0]
    # the permutation is DistributedSampler's, seeded by (seed, epoch): the same object on every rank
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=2, rank=1, shuffle=True, seed=100_003)
    sampler.set_epoch(1)
    assert orders[1, 1] == list(sampler)


def test_odd_training_set_pads_so_every_rank_runs_the_same_steps():
    loaders = [FolderLoader(list(range(11)), batch_size=2, train=True, rank=r, world_size=3) for r in range(3)]
    assert {len(lo._order()) for lo in loaders} == {4} and {len(lo) for lo in loaders} == {2}
    assert set().union(*(lo._order() for lo in loaders)) == set(range(11))


def test_evaluation_shards_count_every_image_exactly_once(fashion_dir):
    x, y = _fashion(101)
    shards = [TensorLoader(x, y, INFO["fashion-mnist"], batch_size=16, train=False, rank=r, world_size=2) for r in (0, 1)]
    seen = torch.cat([yb for s in shards for _, yb in s])
    assert len(seen) == 101 and sorted(seen.tolist()) == sorted(y.tolist())
    folder = [FolderLoader(list(range(101)), batch_size=16, train=False, rank=r, world_size=2)._order() for r in (0, 1)]
    assert sorted(folder[0] + folder[1]) == list(range(101))


def test_unsharded_bundle_gives_rank_0_the_whole_data(fashion_dir):
    x, y = _fashion(101)
    info = INFO["fashion-mnist"]
    bundle = DataBundle(info, TensorLoader(x, y, info, batch_size=8, train=True, rank=1, world_size=2), None,
                        TensorLoader(x, y, info, batch_size=16, train=False, rank=1, world_size=2))
    whole = bundle.unsharded()
    assert whole.train.batch_size == 16 and whole.train.world_size == 1 and sum(len(b) for _, b in whole.test) == 101


def test_build_data_splits_the_global_batch(fashion_dir):
    cfg = resolve(None, sets=["data.subset=100"]).data
    data = build_data(cfg, batch_size=32, rank=1, world_size=2)
    assert data.train.batch_size == 16 and data.train.rank == 1
    with pytest.raises(ConfigError, match="divide"):
        build_data(cfg, batch_size=33, world_size=2)
    with pytest.raises(ConfigError, match="image_size"):
        build_data(resolve(None, sets=["data.subset=100", "data.image_size=64"]).data, batch_size=32)


def test_setup_checks_batch_and_sync_bn():
    with pytest.raises(ConfigError, match=r"batch_size=30 is the global batch.*4 processes.*batch_size=32"):
        distributed.check_setup(resolve(None, sets=["train.batch_size=30"]), torch.device("cpu"), 4)
    with pytest.raises(ConfigError, match=r"finetune.batch_size=30 is the global batch.*finetune.batch_size=32"):
        distributed.check_setup(resolve(None, sets=["finetune.batch_size=30"]), torch.device("cpu"), 4)
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        distributed.check_setup(resolve(None, sets=["train.sync_bn=true"]), torch.device("cpu"), 2)
    distributed.check_setup(resolve(None, sets=["train.sync_bn=true"]), torch.device("cpu"), 1)  # one process: nothing to sync


def test_imagenet_recipe_splits_its_batch_over_8_gpus():
    r = resolve("resnet50-imagenet")
    assert r.data.name == "imagefolder" and r.data.image_size == 224 and r.model.small_input is False
    distributed.check_setup(r, torch.device("cuda"), 8)  # 1024 = 8 x 128
    assert "--nproc 8" in r.description and "nproc_per_node=8" in r.description


def test_revert_sync_batchnorm_keeps_the_tensors():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    weight = model[1].weight
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(model[1], nn.SyncBatchNorm)
    distributed.revert_sync_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d and model[1].weight is weight


def test_strip_option():
    assert strip_option(["resnet18", "--nproc", "2", "--nproc=3", "-q"], "--nproc") == ["resnet18", "-q"]


def test_single_process_helpers_do_nothing():
    model = nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu")) is model
    assert distributed.all_gather_json({"a": 1}) == [{"a": 1}] and distributed.broadcast_json([1]) == [1]
    assert distributed.from_rank0(len) is len
    with pytest.raises(ConfigError, match="boom"):
        distributed.agree(ConfigError("boom"))


# -------------------------------------------------------------------------- two processes


def _free_port() -> int:
    """A port with the next 16 free as well (the parts of the two-process worker use one each)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000 and all(_port_free(port + i) for i in range(1, 16)):
            return port
    raise RuntimeError("no 16 free ports in a row")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _spawn(fn, *args, nprocs: int = 2) -> None:
    port = _free_port()
    mp.spawn(_entry, args=(nprocs, port, fn, args), nprocs=nprocs, join=True)


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    """What torchrun does for each worker: the environment of the process group, then the program."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    fn(rank, *args)


def _state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _two_process_worker(rank: int, out: str) -> None:
    """Everything the two-process tests look at, in one start of two processes.  Each part starts its
    own process group (as a program under torchrun does), each on its own port: a rank that finished
    a part early must not reach the previous group's store, still open in rank 0."""
    base = int(os.environ["MASTER_PORT"])
    parts = [lambda: _failing_worker(rank, out), lambda: _folder_worker(rank, out), lambda: _train_and_prune(rank, 2, out)]
    for i, part in enumerate(parts):
        os.environ["MASTER_PORT"] = str(base + i)
        part()


def _two_process_pipeline_worker(rank: int, out: str) -> None:
    """A whole pipeline run in two processes, then its resumption (each on its own ports)."""
    _pipeline_worker(rank, out, PIPELINE, int(os.environ["MASTER_PORT"]) + 1)


def _folder_worker(rank: int, out: str) -> None:
    """An image folder with one truncated JPEG, read by two processes at 32 px."""
    from convsim_shrink.recipe import DataConfig

    with distributed.session(torch.device("cpu")):
        data = build_data(DataConfig(name="imagefolder", dir=str(Path(out) / "images"), workers=0, image_size=32), batch_size=4,
                          rank=distributed.rank(), world_size=distributed.world_size())
        data.train.set_epoch(1)
        shapes = [list(x.shape) for x, _ in data.train]
        labels = [y.tolist() for _, y in data.test]
    record = {"train": data.train._order(), "test": data.test._order(), "unreadable": data.scan.unreadable, "shapes": shapes,
              "labels": labels, "train_images": data.train.num_samples}
    (Path(out) / f"folder{rank}.json").write_text(json.dumps(record))


def _failing_worker(rank: int, out: str) -> None:
    """A run whose preflight fails on rank 1 only (say, its node cannot write the output folder)."""
    import convsim_shrink.pipeline.runner as runner_module
    from convsim_shrink.errors import ConvSimError, OutputNotWritableError
    from convsim_shrink.pipeline.runner import Runner

    real = runner_module.check_run

    def check_run(*args, **kwargs):
        if rank == 1:
            raise OutputNotWritableError("cannot write /x: read-only file system")
        return real(*args, **kwargs)

    runner_module.check_run = check_run
    try:
        Runner(resolve(None, sets=PIPELINE), Path(out) / "failed").run()
        outcome = None
    except ConvSimError as exc:
        outcome = [type(exc).__name__, str(exc)]
    finally:
        runner_module.check_run = real
    (Path(out) / f"failed{rank}.json").write_text(json.dumps(outcome))


def _pipeline_worker(rank: int, out: str, sets: list[str], port: int) -> None:
    from convsim_shrink.pipeline.runner import Runner
    from convsim_shrink.pipeline.state import RunState

    out = Path(out)
    result = Runner(resolve(None, sets=sets), out / "run").run()
    dense = _state_of(result.dense_model)
    torch.save({"model": _state_of(result.model), "dense": dense, "report": result.report}, out / f"rank{rank}.pt")
    # resume under torchrun: forget the fine-tuning; it resumes from finetune.pt on every rank
    os.environ["MASTER_PORT"] = str(port)
    with distributed.session(torch.device("cpu")):
        if rank == 0:
            state = RunState.load(out / "run" / "state.json")
            state.completed = ["build", "premin", "train", "prune"]
            state.save(out / "run" / "state.json")
        distributed.barrier()
    os.environ["MASTER_PORT"] = str(port + 1)
    again = Runner(resolve(None, sets=sets), out / "run", resume=True).run()
    torch.save({"model": _state_of(again.model), "dense": _state_of(again.dense_model), "report": again.report}, out / f"resumed{rank}.pt")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, fashion_dir) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    image_folder(out / "images", {"train": {"a": 5, "b": 5}, "val": {"a": 3, "b": 2}}, size=(40, 48))
    truncate(out / "images" / "train" / "b" / "2.jpg")
    _spawn(_two_process_worker, str(out))
    return out


@pytest.fixture(scope="module")
def two_process_pipeline(tmp_path_factory, fashion_dir) -> Path:
    out = tmp_path_factory.mktemp("ddp-pipeline")
    _spawn(_two_process_pipeline_worker, str(out))
    return out


@pytest.mark.slow
def test_two_processes_write_one_run_directory_and_report(two_process_pipeline):
    out = two_process_pipeline
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["run"]
    assert not list((out / "run").glob(".*.tmp"))
    report = json.loads((out / "run" / "report.json").read_text())
    assert report["world_size"] == 2 and report["global_batch"] == 32 and report["per_process_batch"] == 16
    assert "Processes: 2; global batch 32 (16 per process)" in (out / "run" / "report.md").read_text()
    assert report["test_images"] == 101
    first = [torch.load(out / f"rank{r}.pt", weights_only=True)["report"] for r in (0, 1)]
    resumed = [torch.load(out / f"resumed{r}.pt", weights_only=True)["report"] for r in (0, 1)]
    report.pop("plots")  # written into report.json only
    assert first[0] == first[1] and resumed[0] == resumed[1] == report  # rank 1 receives rank 0's report


def test_an_error_on_one_rank_stops_every_rank_with_its_message(two_processes):
    outcomes = [json.loads((two_processes / f"failed{r}.json").read_text()) for r in (0, 1)]
    # rank 0, which speaks for all, names the process; rank 1 raises its own error
    assert outcomes[0] == ["OutputNotWritableError", "process 1: cannot write /x: read-only file system"]
    assert outcomes[1] == ["OutputNotWritableError", "cannot write /x: read-only file system"]
    assert not (two_processes / "failed").exists()  # nothing written


def test_image_folder_is_dealt_out_by_rank(two_processes):
    r0, r1 = (json.loads((two_processes / f"folder{r}.json").read_text()) for r in (0, 1))
    assert r0["unreadable"] == r1["unreadable"] and [p for p, _ in r0["unreadable"]] == ["train/b/2.jpg"]
    assert r0["train_images"] == 9 and len(r0["train"]) == len(r1["train"]) == 5  # 9 images padded to 10
    assert set(r0["train"]) | set(r1["train"]) == set(range(9))
    assert r0["shapes"] == r1["shapes"] == [[2, 3, 32, 32]] * 2  # global batch 4 = 2 per process, at data.image_size
    assert sorted(r0["test"] + r1["test"]) == list(range(5)) and sum(map(len, r0["labels"] + r1["labels"])) == 5


@pytest.mark.slow
def test_two_processes_end_with_identical_models(two_process_pipeline):
    ranks = [torch.load(two_process_pipeline / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ("dense", "model"):
        a, b = ranks[0][key], ranks[1][key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_under_two_processes(two_process_pipeline):
    out = two_process_pipeline
    first = torch.load(out / "rank0.pt", weights_only=True)
    again = [torch.load(out / f"resumed{r}.pt", weights_only=True) for r in (0, 1)]
    # fine-tuning was finished in finetune.pt, so every rank loads it instead of training again
    for r in (0, 1):
        assert all(torch.equal(first["model"][k], again[r]["model"][k]) for k in first["model"])
        assert all(torch.equal(first["dense"][k], again[r]["dense"][k]) for k in first["dense"])
    ckpt = torch.load(out / "run" / "finetune.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and "scaler" in ckpt


class _NoBN(nn.Module):
    """Two convs and a head, no batch norm: a model whose training is the same for any split of the batch."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.features(x))


def _train_and_prune(rank: int, world: int, out: str) -> None:
    """Train the no-BN model 8 steps on 256 Fashion-MNIST images (global batch 32, augmented), evaluate
    on 101 test images, then prune with a gradient criterion; save what each rank has."""
    from convsim_shrink.pipeline.stages import prune_stage
    from convsim_shrink.recipe import FinetuneConfig, PruneConfig, TrainConfig
    from convsim_shrink.train import evaluate, fit, resolve_precision

    with distributed.session(torch.device("cpu")):
        torch.manual_seed(0)
        model = _NoBN()
        x, y = load_arrays("fashion-mnist", None, "train")
        xt, yt = load_arrays("fashion-mnist", None, "test")
        info = INFO["fashion-mnist"]
        train = TensorLoader(x[:256], y[:256], info, batch_size=32 // world, train=True, seed=5, rank=rank, world_size=world)
        test = TensorLoader(xt[:101], yt[:101], info, batch_size=16, train=False, rank=rank, world_size=world)
        cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, precision="fp32", channels_last=False, weight_decay=0.0)
        fit(model, train, cfg, device=torch.device("cpu"), quiet=True)
        ev = evaluate(model, test, resolve_precision(torch.device("cpu"), "fp32", False))
        pcfg = PruneConfig(target_params=0.6, criterion="convsim-taylor", calibration_batches=2, bn_recalibration=0, round_to=None)
        pruned = prune_stage(model, DataBundle(info, train, None, test), pcfg, example_inputs=torch.zeros(1, 1, 28, 28),
                             finetune=FinetuneConfig(precision="fp32", channels_last=False), device=torch.device("cpu"))
        torch.save({"trained": _state_of(model), "eval": ev, "pruned": _state_of(pruned.model), "pruned_acc": pruned.accuracy},
                   Path(out) / f"{world}-{rank}.pt")


def _kept_channels(dense: dict, pruned: dict) -> list[int]:
    """Indices of the first conv's filters that survived pruning (matched by their weights)."""
    d, p = dense["features.0.weight"].flatten(1), pruned["features.0.weight"].flatten(1)
    return [int(torch.cdist(row[None], d).argmin()) for row in p]


@pytest.fixture(scope="module")
def train_and_prune(two_processes):
    out = two_processes
    _entry_single(str(out))
    return {(w, r): torch.load(out / f"{w}-{r}.pt", weights_only=True) for w, r in ((2, 0), (2, 1), (1, 0))}


def _entry_single(out: str) -> None:
    saved = {k: os.environ.pop(k, None) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    try:
        _train_and_prune(0, 1, out)
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def test_two_processes_match_one_with_the_same_global_batch(train_and_prune):
    one, two = train_and_prune[1, 0]["trained"], train_and_prune[2, 0]["trained"]
    scale = max(float(v.abs().max()) for v in one.values())
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst <= 1e-4 * scale
    assert all(torch.equal(train_and_prune[2, 0]["trained"][k], train_and_prune[2, 1]["trained"][k]) for k in one)


def test_evaluation_is_all_reduced_over_the_whole_test_set(train_and_prune):
    e0, e1, single = (train_and_prune[k]["eval"] for k in ((2, 0), (2, 1), (1, 0)))
    assert e0 == e1  # every rank reports the same number
    assert abs(e0["acc"] - single["acc"]) <= 100 / 101 + 1e-9  # 101 images, each counted once (a tie may flip one)
    assert e0["acc"] * 101 / 100 == pytest.approx(round(e0["acc"] * 101 / 100), abs=1e-6)  # a count out of 101


def test_pruning_keeps_the_same_channels_on_every_rank(train_and_prune):
    r0, r1 = train_and_prune[2, 0], train_and_prune[2, 1]
    assert r0["pruned"].keys() == r1["pruned"].keys()
    assert all(r0["pruned"][k].shape == r1["pruned"][k].shape for k in r0["pruned"])
    kept0, kept1 = _kept_channels(r0["trained"], r0["pruned"]), _kept_channels(r1["trained"], r1["pruned"])
    assert kept0 == kept1 and len(kept0) < 8
    assert all(torch.equal(r0["pruned"][k], r1["pruned"][k]) for k in r0["pruned"]) and r0["pruned_acc"] == r1["pruned_acc"]


@pytest.mark.slow
def test_cli_nproc_runs_torchrun_end_to_end_and_resumes(tmp_path, fashion_dir):
    """``convsim-shrink MODEL --nproc 2`` as a user types it (torchrun underneath), then ``--resume``."""
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "convsim_shrink"]
    sets = [a for s in PIPELINE for a in ("--set", s)]
    done = subprocess.run([*base, "simple_cnn", "--nproc", "2", "--out", str(out), *sets], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["global_batch"] == 32
    assert done.stderr.count("report:") == 1  # rank 0 alone prints
    state = json.loads((out / "state.json").read_text())
    state["completed"] = ["build", "premin", "train"]
    (out / "state.json").write_text(json.dumps(state))
    again = subprocess.run([*base, "--resume", str(out), "--nproc", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "state.json").read_text())["completed"][-1] == "export"
    bad = subprocess.run([*base, "simple_cnn", "--nproc", "2", "--out", str(out), *sets], env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "already exists" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------ the command line


def _main_exit(args) -> int:
    from convsim_shrink.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


def test_nproc_hands_the_command_line_to_torchrun_with_one_run_directory(monkeypatch, tmp_path):
    import convsim_shrink.launch as launch_module

    seen = {}

    def fake_launch(nproc, args):
        seen.update(nproc=nproc, args=args)
        return 0

    monkeypatch.setattr(launch_module, "launch", fake_launch)
    monkeypatch.chdir(tmp_path)
    assert _main_exit(["simple_cnn", "--nproc", "2", "--set", "train.batch_size=64", "-q"]) == 0
    assert seen["nproc"] == 2 and "--nproc" not in seen["args"] and seen["args"][:5] == ["simple_cnn", "--set", "train.batch_size=64", "-q", "--out"]
    assert seen["args"][5].startswith(str(Path("runs") / "simple_cnn-"))  # every process gets the same name


def test_nproc_mistakes_are_one_line_before_anything_starts(monkeypatch, capsys):
    import convsim_shrink.launch as launch_module

    monkeypatch.setattr(launch_module, "launch", lambda *a: pytest.fail("launched"))
    assert _main_exit(["simple_cnn", "--nproc", "2", "--set", "train.batch_size=63"]) == 2
    assert "train.batch_size=63 is the global batch" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    for key, value in (("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(key, value)
    assert _main_exit(["simple_cnn", "--nproc", "2"]) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err


def _statistics_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))


def _statistics_images() -> torch.Tensor:
    return torch.randn(16, 2, 5, 5, generator=torch.Generator().manual_seed(1))


def _statistics_worker(rank: int, out: str) -> None:
    """Each rank reads its half of the images; the all-reduced statistics go to statistics{rank}.pt."""
    from convsim_shrink.prune.compensation import collect_input_statistics

    with distributed.session(torch.device("cpu")):
        x = _statistics_images()[rank::2]
        stats = collect_input_statistics(_statistics_model(), [(x[i:i + 4], torch.zeros(4, dtype=torch.long)) for i in (0, 4)], 2)
        torch.save({"count": stats.count, "sums": stats.sums, "products": stats.products}, Path(out) / f"statistics{rank}.pt")


def test_compensation_statistics_are_all_reduced_to_the_single_process_ones(tmp_path):
    """Under torchrun every rank must compensate identically: the statistics of two ranks, each over its
    shard, equal one process's over all the images."""
    from convsim_shrink.prune.compensation import collect_input_statistics

    _spawn(_statistics_worker, str(tmp_path))
    x = _statistics_images()
    single = collect_input_statistics(_statistics_model(), [(x[i:i + 4], torch.zeros(4, dtype=torch.long)) for i in range(0, 16, 4)], 4)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"statistics{rank}.pt", weights_only=True)
        assert got["count"] == single.count
        for name in single.count:
            torch.testing.assert_close(got["sums"][name], single.sums[name])
            torch.testing.assert_close(got["products"][name], single.products[name])


def _refit_pair():
    """The statistics model and a perturbed copy of it (what pruning upstream would have changed)."""
    dense = _statistics_model()
    torch.manual_seed(5)
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned[0].weight.add_(0.3 * torch.randn_like(pruned[0].weight))
    return dense, pruned


def _refit_worker(rank: int, out: str) -> None:
    """Each rank refits on its half of the images; the refitted weights go to refit{rank}.pt."""
    from convsim_shrink.prune.compensation import CompensationReport, refit_to_dense

    with distributed.session(torch.device("cpu")):
        dense, pruned = _refit_pair()
        x = _statistics_images()[rank::2]
        refit_to_dense(pruned, dense, CompensationReport(), [(x[i:i + 4], torch.zeros(4, dtype=torch.long)) for i in (0, 4)], 2,
                       max_rows=None)
        torch.save(pruned.state_dict(), Path(out) / f"refit{rank}.pt")


def test_the_refit_is_all_reduced_so_every_rank_refits_as_one_process(tmp_path):
    from convsim_shrink.prune.compensation import CompensationReport, refit_to_dense

    _spawn(_refit_worker, str(tmp_path))
    dense, single = _refit_pair()
    x = _statistics_images()
    refit_to_dense(single, dense, CompensationReport(), [(x[i:i + 4], torch.zeros(4, dtype=torch.long)) for i in range(0, 16, 4)], 4,
                   max_rows=None)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"refit{rank}.pt", weights_only=True)
        for key, value in single.state_dict().items():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5)
    # the perturbed layer reads the images, which did not change: the refit gives it back the dense weights
    perturbed = _refit_pair()[1]
    assert not torch.allclose(perturbed[0].weight, dense[0].weight)
    torch.testing.assert_close(single[0].weight, dense[0].weight, atol=1e-4, rtol=1e-4)
