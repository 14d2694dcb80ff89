import math

import pytest
import torch
from torch import nn

from convsim_shrink.cs.similarity import model_conv_similarity
from convsim_shrink.data import build_data
from convsim_shrink.errors import CheckpointError, ConfigError, TrainingDivergedError
from convsim_shrink.models import create_model
from convsim_shrink.recipe import DataConfig, TrainConfig
from convsim_shrink.train import (
    Schedule,
    accumulate_gradients,
    cs_regularizer,
    distillation,
    evaluate,
    fit,
    load_training_state,
    make_optimizer,
    recalibrate_bn,
    resolve_precision,
    train_one_epoch,
)


@pytest.fixture(scope="module")
def tiny(fashion_dir):
    return build_data(DataConfig(subset=1024, test_subset=500), batch_size=64)


def _model(seed=0, width=0.25):
    torch.manual_seed(seed)
    return create_model("simple_cnn", num_classes=10, in_channels=1, width=width)


def _cfg(**kw):
    base = dict(epochs=2, lr=0.05, warmup_epochs=0.5)
    base.update(kw)
    return TrainConfig(**base)


def test_fit_learns_real_data(tiny):
    model = _model(width=0.5)
    before = evaluate(model, tiny.test)["acc"]
    result = fit(model, tiny.train, _cfg(epochs=4), eval_loader=tiny.test, quiet=True)
    assert len(result.history) == 4
    assert result.final["val_acc"] > 55 and result.final["val_acc"] > before + 20
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.final["images_per_s"] > 0


def test_seeded_runs_are_reproducible(tiny):
    a, b = _model(1), _model(1)
    fit(a, tiny.train, _cfg(), quiet=True)
    fit(b, tiny.train, _cfg(), quiet=True)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        # the same seed gives the same run up to round-off (unseeded, weights differ by ~1e-2)
        assert torch.allclose(pa.float(), pb.float(), rtol=1e-5, atol=1e-6 * (1 + pa.float().abs().max().item()))


def test_resume_continues_exactly(tiny, tmp_path):
    straight = _model(2)
    fit(straight, tiny.train, _cfg(epochs=3), quiet=True)
    ckpt = tmp_path / "train.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(_model(2), tiny.train, _cfg(epochs=3), quiet=True, checkpoint=ckpt, on_epoch=_stop_after(2))
    resumed = _model(2)  # a fresh process would rebuild the model from scratch
    result = fit(resumed, tiny.train, _cfg(epochs=3), quiet=True, checkpoint=ckpt, resume=True)
    assert result.resumed_from_epoch == 2 and len(result.history) == 3
    for pa, pb in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(pa.float(), pb.float(), atol=1e-6)


def _stop_after(n):
    """An epoch callback that simulates Ctrl-C after epoch ``n``."""

    def cb(epoch, metrics):
        if epoch == n:
            raise KeyboardInterrupt

    return cb


def test_fit_interrupted_leaves_resumable_checkpoint(tiny, tmp_path):
    ckpt = tmp_path / "t.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), tiny.train, _cfg(epochs=3), quiet=True, checkpoint=ckpt, on_epoch=_stop_after(1))
    state = load_training_state(ckpt)
    assert state["epoch"] == 1 and state["stage"] == "train"
    assert not list(tmp_path.glob(".*tmp"))  # no half-written file left behind


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    calls = {"n": 0}
    per_epoch = len(tiny.train)

    def poison(model, x, y, logits):
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] > per_epoch + 2 else logits.sum() * 0

    ckpt = tmp_path / "t.pt"
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        fit(_model(), tiny.train, _cfg(epochs=3), quiet=True, checkpoint=ckpt, extra=(poison,))
    state = load_training_state(ckpt)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _one_epoch(data, sync_every, extra=()):
    model = _model(3)
    cfg = _cfg(epochs=1)
    prec = resolve_precision(torch.device("cpu"), "fp32", False)
    schedule = Schedule(cfg.lr, len(data.train))
    torch.manual_seed(0)
    return train_one_epoch(model, data.train, make_optimizer(model, cfg), schedule, prec=prec, extra=extra, sync_every=sync_every)


def test_deferred_host_sync_gives_the_same_epoch_and_still_catches_divergence(tiny):
    # the accelerator path (running sums on the device, read every k steps) against the per-step path
    def kd_like(model, x, y, logits):
        return 0.01 * logits.float().pow(2).mean()

    kd_like.__name__ = "reg"
    a, step_a = _one_epoch(tiny, 1, (kd_like,))
    b, step_b = _one_epoch(tiny, 5, (kd_like,))
    assert step_a == step_b == len(tiny.train)
    for k in ("train_loss", "train_acc", "train_reg"):
        assert b[k] == pytest.approx(a[k], rel=1e-5), k

    calls = {"n": 0}

    def poison(model, x, y, logits):
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] == 3 else logits.sum() * 0

    with pytest.raises(TrainingDivergedError, match="non-finite by step"):
        _one_epoch(tiny, 5, (poison,))
    assert calls["n"] <= 5  # reported at the first sync after the bad step, not at the end of the epoch


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_training_state(bad)


def test_checkpoint_holding_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"stage": "train", "x": Evil()}, p)
    with pytest.raises(CheckpointError):
        load_training_state(p)


def test_schedule_warmup_cosine_multistep():
    s = Schedule(0.1, total_steps=110, warmup_steps=10)
    assert s(0) == pytest.approx(0.01) and s(9) == pytest.approx(0.1)
    assert s(10) == pytest.approx(0.1) and s(60) == pytest.approx(0.05) and s(110) == pytest.approx(0.0, abs=1e-12)
    m = Schedule(1.0, total_steps=100, kind="multistep", milestones=(0.5, 0.75), gamma=0.1)
    assert [m(10), m(50), m(80)] == pytest.approx([1.0, 0.1, 0.01])


def test_cs_regulariser_lowers_cs(tiny):
    plain, reg = _model(3), _model(3)
    fit(plain, tiny.train, _cfg(epochs=1), quiet=True)
    fit(reg, tiny.train, _cfg(epochs=1, cs_beta=0.5, cs_every=1), quiet=True)
    assert cs_regularizer(0.5)(reg, None, None, None) > 0
    with torch.no_grad():
        assert model_conv_similarity(reg, normalized=True) < 0.8 * model_conv_similarity(plain, normalized=True)


def test_distillation_is_zero_against_itself_and_positive_otherwise():
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    term = distillation(teacher, weight=1.0, temperature=2.0)
    assert term(teacher, x, None, teacher(x)).item() == pytest.approx(0.0, abs=1e-6)
    assert term(teacher, x, None, torch.zeros(8, 3)).item() > 0


def test_distillation_every_k_steps_runs_the_teacher_on_every_kth_call_only_with_k_times_the_term():
    """``finetune.distill_every=k``: calls 1, k+1, 2k+1, ... run the teacher and give k times the every-step
    term; the calls between run no teacher and give zero, so the mean over k calls is the every-step term."""
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    forwards = []
    teacher.register_forward_hook(lambda m, i, o: forwards.append(1))
    x, student_logits = torch.randn(8, 4), torch.randn(8, 3)
    want = distillation(teacher, 0.5, 2.0)(None, x, None, student_logits).item()
    assert want > 0 and len(forwards) == 1
    forwards.clear()
    term = distillation(teacher, 0.5, 2.0, every=3)
    got = [term(None, x, None, student_logits).item() for _ in range(7)]
    assert len(forwards) == 3  # calls 1, 4 and 7
    assert [g > 0 for g in got] == [True, False, False, True, False, False, True]
    assert got[0] == pytest.approx(3 * want, rel=1e-6) and got[3] == pytest.approx(3 * want, rel=1e-6)
    assert sum(got[:6]) / 6 == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="every=0"):
        distillation(teacher, 0.5, 2.0, every=0)


def test_distillation_in_inference_mode_and_channels_last_gives_the_direct_formulas_gradient():
    """The teacher now runs under inference_mode, at the engine's precision and memory format; the loss and
    the student's gradient are those of the formula written out with an fp32 teacher under no_grad."""
    import copy

    import torch.nn.functional as F

    torch.manual_seed(0)
    teacher = create_model("resnet18", num_classes=10, in_channels=1, width=0.125, small_input=True).eval()
    student = create_model("resnet18", num_classes=10, in_channels=1, width=0.125, small_input=True)
    x = torch.randn(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t_logits = teacher(x)
    t = 3.0
    logits = student(x)
    want = 0.5 * t * t * F.kl_div(F.log_softmax(logits / t, 1), F.softmax(t_logits / t, 1), reduction="batchmean")
    (want_grad,) = torch.autograd.grad(want, student.fc.weight)

    prec = resolve_precision(torch.device("cpu"), "fp32", True)
    term = distillation(copy.deepcopy(teacher), 0.5, t, prec=prec)
    logits = student(x.contiguous(memory_format=torch.channels_last))
    got = term(student, x.contiguous(memory_format=torch.channels_last), None, logits)
    (got_grad,) = torch.autograd.grad(got, student.fc.weight)
    assert float(got) == pytest.approx(float(want), rel=1e-4) and float(want) > 0
    assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-7)


def test_non_finite_weights_found_between_the_sparse_checks_stop_the_epoch_before_its_checkpoint(tiny):
    """Weights are checked at an epoch's first and last step and every few steps between; a buffer that
    goes non-finite mid-epoch (invisible to training-mode outputs) still stops the epoch, by its end."""
    calls = {"n": 0}
    model = _model()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))

    def poison_bn():  # after the third backward pass
        calls["n"] += 1
        if calls["n"] == 3:
            bn.running_var[0] = float("inf")

    assert len(tiny.train) > 3
    with pytest.raises(TrainingDivergedError, match=r"weights became non-finite \(.*running_var\)"):
        fit(model, tiny.train, _cfg(epochs=2, precision="fp32"), quiet=True, after_backward=poison_bn)
    assert calls["n"] <= len(tiny.train)  # stopped within the first epoch


def test_evaluate_matches_manual_count(tiny):
    model = _model().eval()
    got = evaluate(model, tiny.test)
    with torch.no_grad():  # batch by batch as evaluate does: one big batch may round differently and flip a near-tie
        logits = torch.cat([model(x) for x, _ in tiny.test])
    labels = torch.cat([y for _, y in tiny.test])
    assert got["acc"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    assert math.isfinite(got["loss"])


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "fp32").dtype is None
    assert resolve_precision(cpu, "bf16").dtype == torch.bfloat16
    assert resolve_precision(cpu, "auto", channels_last=False).channels_last is False
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision(cpu, "fp16")


def test_cs_regulariser_every_k_steps_applies_k_times_the_weight():
    model = _model(4)
    x = torch.randn(2, 1, 28, 28)
    logits = model(x)
    exact = cs_regularizer(0.1)(model, x, None, logits)
    term = cs_regularizer(0.1, every=3)
    values = [term(model, x, None, logits) for _ in range(6)]
    assert [float(v.detach()) == 0.0 for v in values] == [False, True, True, False, True, True]
    assert float(values[0].detach()) == pytest.approx(3 * float(exact.detach()), rel=1e-6)
    assert values[0].requires_grad


def test_accumulate_gradients_sums_the_first_batches(tiny):
    model = _model(4)
    assert accumulate_gradients(model, tiny.train, 2) == 2
    batches = iter(tiny.train)
    ref = _model(4)
    ref.train()
    for _ in range(2):
        x, y = next(batches)
        torch.nn.functional.cross_entropy(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_progress_off_a_terminal_prints_a_line_per_epoch(tiny, monkeypatch):
    # a log file or pipe: a live bar would show nothing until the stage ends, so each epoch gets a line
    from convsim_shrink.console import console
    from convsim_shrink.train import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 1e9)  # no line while an epoch runs (the next test has those)

    assert not console.is_terminal  # pytest captures stderr
    with console.capture() as cap:
        fit(_model(), tiny.train, _cfg(epochs=2), eval_loader=tiny.test, quiet=False, stage="train")
    lines = [line for line in cap.get().splitlines() if line.startswith("train ")]
    assert [line.split(":")[0] for line in lines] == ["train 1/2", "train 2/2"], cap.get()
    assert all("loss" in line and "train acc" in line and "img/s" in line and "val acc" in line and line.endswith(" s)") for line in lines)
    assert "train ends in ~" in lines[0] and "ends in" not in lines[1]  # the stage's estimate, after every epoch but the last
    with console.capture() as cap:
        fit(_model(), tiny.train, _cfg(epochs=1), quiet=True)
    assert cap.get() == ""


def test_progress_off_a_terminal_prints_running_lines_so_a_log_never_looks_hung(tiny, monkeypatch):
    from convsim_shrink.console import console
    from convsim_shrink.train import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line at every host sync (every step on the CPU)
    with console.capture() as cap:
        fit(_model(), tiny.train, _cfg(epochs=1), quiet=False, stage="train")
    lines = [line for line in cap.get().splitlines() if line.startswith("train 1/1: ")]
    running = [line for line in lines if line.split(": ")[1][0].isdigit()]
    steps = len(tiny.train)
    assert len(running) == steps and len(lines) == steps + 1, cap.get()  # one per step, then the finished line
    assert [int(line.split(": ")[1].split("/")[0]) for line in running] == list(range(1, steps + 1))
    assert all(line.split(": ")[1].split()[0].endswith(f"/{steps}") and "train acc" in line for line in running)


def test_backward_step_with_a_scaler_matches_the_plain_step_and_skips_an_overflow():
    """fp16's loss scaling must not change what the step does: ``after_backward`` and clipping see the
    true gradients and the update equals the unscaled one; an overflowing step changes nothing."""
    from convsim_shrink.train.loop import _backward_step

    def one_step(scaler, loss_factor=1.0):
        torch.manual_seed(0)
        m = nn.Linear(4, 3)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        x = torch.randn(5, 4)
        before = m.weight.detach().clone()
        seen = []
        _backward_step(m(x).pow(2).mean() * loss_factor, m, opt, scaler=scaler, grad_clip=0.05,
                       after_backward=lambda: seen.append(m.weight.grad.norm().item()))
        return before, m.weight.detach(), seen

    _, plain, plain_seen = one_step(None)
    _, scaled, scaled_seen = one_step(torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert torch.allclose(scaled, plain, rtol=1e-5, atol=1e-7)
    assert scaled_seen[0] == pytest.approx(plain_seen[0], rel=1e-5) and plain_seen[0] > 0.05  # clipping had work to do
    before, after, _ = one_step(torch.amp.GradScaler("cpu", init_scale=1024.0), loss_factor=float("inf"))
    assert torch.equal(before, after)


def test_recalibrate_bn_re_estimates_every_norm_but_those_kept():
    """Each norm's statistics become the average of its per-batch mean and unbiased variance (momentum None),
    computed here directly; a norm in ``keep`` keeps its statistics exactly; the model's mode is restored."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3)).eval()
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.fill_(5.0)
            bn.running_var.fill_(7.0)
    xs = [torch.randn(6, 2, 5, 5) for _ in range(3)]
    loader = [(x, torch.zeros(6, dtype=torch.long)) for x in xs]
    kept_before = (m[4].running_mean.clone(), m[4].running_var.clone())
    assert recalibrate_bn(m, loader, batches=3, keep=[m[4]]) == 3
    with torch.no_grad():
        outs = [m[0](x) for x in xs]
    want_mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    want_var = torch.stack([o.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(m[1].running_mean, want_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m[1].running_var, want_var, atol=1e-5, rtol=1e-5)
    assert torch.equal(m[4].running_mean, kept_before[0]) and torch.equal(m[4].running_var, kept_before[1])
    assert not m.training and not m[4].training


def test_channels_last_hazard_names_a_narrow_strided_1x1_conv_only():
    from convsim_shrink.train.device import channels_last_hazard

    assert "1x1 conv, stride 2, 4 input channels" in channels_last_hazard(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 1, stride=2)))
    wide = channels_last_hazard(nn.Sequential(nn.Conv2d(12, 24, 1, stride=2)))  # under AVX-512's block of 16 only
    assert (wide is not None) == ("AVX512" in torch.backends.cpu.get_cpu_capability())
    for ok in (nn.Conv2d(16, 32, 1, stride=2), nn.Conv2d(1, 4, 1, stride=2), nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 3, stride=2)):
        assert channels_last_hazard(nn.Sequential(ok)) is None


_HAZARD_SCRIPT = """
import torch
from torch import nn
from convsim_shrink.recipe import TrainConfig
from convsim_shrink.train import fit
torch.manual_seed(0)
# 3 input channels: the first conv's kernel is then really channels_last, and so is every activation after it
model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 1, stride=2),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
data = [(torch.randn(128, 3, 28, 28), torch.randint(0, 10, (128,))) for _ in range(40)]
fit(model, data, TrainConfig(epochs=1, precision="fp32"), device=torch.device("cpu"), quiet=True)
print("trained")
"""


def test_a_model_channels_last_would_crash_on_trains_contiguous():
    """PyTorch's CPU convolutions corrupt the heap training a 1x1 stride-2 conv on 2-7 channels in
    channels_last (the process aborts): ``fit`` with channels_last left to the run trains such a model
    contiguous.  In a subprocess, so that a crash is an exit status, not the end of the test run."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _HAZARD_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "trained" in run.stdout  # (the same script with the check patched out aborted: "free(): invalid next size")
