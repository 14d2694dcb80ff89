"""Compensated pruning: a removed channel's contribution is handed to the kept channels that can carry it.

A layer that *reads* a channel (a conv with ``groups=1`` or a linear layer, the channel's *consumer*)
computes ``y = W[:, K] x_K + W[:, P] x_P`` from its kept input channels K and the removed ones P.  If
``x_P ≈ Aᵀ x_K + b`` (least squares over calibration inputs, every image and position), then

    y ≈ (W[:, K] + W[:, P] Aᵀ) x_K + W[:, P] b,

so the consumer keeps (most of) what the removed channels carried: ``W[:, K] += W[:, P] Aᵀ`` and the
constant goes into the consumer's bias, or, for a conv without one that feeds a batch norm, into that
norm's running mean.  For a conv with a k×k kernel the same holds position by position (the fit is per
position and the conv is linear in its input channels), so ``W[:, K, i, j] += Σ_p W[:, p, i, j] A[k, p]``.
Zero padding reads zeros in every channel, so the linear part stays exact at the borders; only the
constant is off there.  This is the per-layer least-squares reconstruction of He et al., "Channel
Pruning for Accelerating Very Deep Neural Networks" (ICCV 2017) and of ThiNet (Luo et al., ICCV 2017),
applied to every consumer of torch-pruning's dependency groups, each fitted on its *own* input: a
residual stream's channel is read by each block's first conv, the shortcut and the classifier, and
each is compensated from the kept channels as *it* sees them.

A linear layer that reads a flattened C×H×W map sees each channel as H·W features; torch-pruning removes
all of them, and each is refitted from the kept features (the fit is per feature, which includes the
per-position fit a conv gets).

What is not compensated (left as plain dropping, and listed in :attr:`InputStatistics.skipped`):
grouped and depthwise convs (an output reads only its own group's channels, so a removed channel's
filter has no kept channels to move to), transposed convs, linear layers with more than
``max_features`` inputs (e.g. a classifier over a flattened 512×7×7 map: its covariance would not fit
in memory), and any consumer that is not a conv or linear layer (attention, norms over channels).

The statistics are those of the model *before* pruning (``x_P`` and ``x_K`` as the dense model
computes them); pruning several groups one after the other composes exactly, because each fit is a
projection onto the kept channels and the kept sets only shrink.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from ..errors import ConfigError
from ..train import distributed
from ..train.calibrate import first_batches
from ..train.device import Precision, resolve_precision
from .safety.limits import bounded

#: modules other than convs and linears that combine channels (a removed channel changes what they compute)
_MIXING = (nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention, nn.LocalResponseNorm)
MAX_FEATURES = 4096  # inputs of one consumer whose covariance is kept (float64: 128 MiB at the limit)
MAX_ROWS = 4096  # rows (images x positions) of one consumer's input kept from each batch (recipe: prune.compensation_rows)


def _consumer_kind(module: nn.Module, max_features: int) -> str | None:
    """Why ``module`` cannot be compensated, or None when it can."""
    if isinstance(module, nn.Linear):
        return None if module.in_features <= max_features else f"linear layer with {module.in_features} > {max_features} inputs"
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return "transposed conv"
        if module.groups > 1:
            return "grouped or depthwise conv"
        return None if module.in_channels <= max_features else f"conv with {module.in_channels} > {max_features} inputs"
    return "not a conv or linear layer"


def _consumers(model: nn.Module, max_features: int, stats: "InputStatistics"):
    """``(name, module, input channels)`` of every conv/linear layer that can be compensated; the others are
    recorded in ``stats.skipped`` with the reason."""
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        reason = _consumer_kind(module, max_features)
        if reason is not None:
            stats.skipped[name] = reason
            continue
        yield name, module, (module.in_features if isinstance(module, nn.Linear) else module.in_channels)


@dataclass
class InputStatistics:
    """First and second moments of every consumer's input channels, over calibration inputs.

    For the layer named ``name`` with ``C`` input channels (a conv) or features (a linear layer):
    ``count[name]`` rows were seen (images × positions), ``sums[name]`` is ``Σ x`` of shape ``(C,)``
    and ``products[name]`` is ``Σ x xᵀ`` of shape ``(C, C)``, both float64 on the CPU.  ``skipped``
    maps the conv/linear layers that are not compensated to the reason.
    """

    count: dict[str, float] = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    products: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    batches: int = 0

    def __contains__(self, name: str) -> bool:
        return name in self.count and self.count[name] > 0

    def mean(self, name: str) -> torch.Tensor:
        """``(C,)`` mean of the layer's input channels."""
        return self.sums[name] / self.count[name]

    def covariance(self, name: str) -> torch.Tensor:
        """``(C, C)`` covariance of the layer's input channels (biased, over every row seen)."""
        mu = self.mean(name)
        return self.products[name] / self.count[name] - torch.outer(mu, mu)


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of channels: ``(N·positions, C)``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    return x.movedim(1, -1).reshape(-1, x.shape[1])


@torch.no_grad()
def collect_input_statistics(
    model: nn.Module,
    loader: Iterable,
    batches: int,
    *,
    prec: Precision | None = None,
    max_features: int = MAX_FEATURES,
    max_rows: int | None = MAX_ROWS,
) -> InputStatistics:
    """The input moments of every conv (``groups=1``) and linear layer of ``model`` over the first
    ``batches`` batches of ``loader``, in one pass in eval mode (as the exported model runs), fp32
    forward (channels_last where :func:`~convsim_shrink.train.device.resolve_precision` finds it faster), float64 sums.

    A conv's input gives ``N * H * W`` rows a batch (every image and position); where that is more than
    ``max_rows``, a uniform sample of ``max_rows`` of them is kept (without replacement, seeded by the
    layer and the batch, so the same data give the same statistics).  The float64 products cost
    ``rows * C**2`` a layer: at 224 px the early layers' 25,000 rows a batch of 8 made the statistics the
    stage's largest part (docs/BENCHMARKS.md, "The prune stage on large models"), while neighbouring
    positions carry nearly the same channel mix.  ``None`` keeps every row.

    Under ``torchrun`` every rank reads ``batches`` batches of its shard and the sums are all-reduced,
    so every rank holds the same statistics (and compensates identically).  Raises
    :class:`~convsim_shrink.errors.ConfigError` when the loader gives no batch.
    """
    device = next(model.parameters()).device
    # channels_last where it is faster (CPU, CUDA): the convs run faster and a layer's input is then already
    # (positions, channels) in memory, so its rows are a view, not a copy
    prec = prec or resolve_precision(device, "fp32", None)
    stats = InputStatistics()
    hooks = []
    if max_rows is not None and max_rows < 1:
        raise ConfigError(f"max_rows = {max_rows} must be at least 1 (or None: every row)")
    batch_index = [0]
    for layer_index, (name, module, c) in enumerate(_consumers(model, max_features, stats)):
        stats.count[name] = 0.0
        stats.sums[name] = torch.zeros(c, dtype=torch.float64)
        stats.products[name] = torch.zeros(c, c, dtype=torch.float64)

        def hook(mod, inputs, name=name, layer_index=layer_index):
            rows = _sample(_rows(mod, inputs[0].detach()), max_rows, layer_index, batch_index[0]).double()
            stats.count[name] += rows.shape[0]
            stats.sums[name] += rows.sum(0).cpu()
            stats.products[name] += (rows.T @ rows).cpu()

        hooks.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    used = 0
    try:
        for x, _ in first_batches(loader, batches, prec):
            model(x.float() if x.is_floating_point() else x)
            used += 1
            batch_index[0] = used
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if used == 0:
        raise ConfigError("the training data gave no batch to fit the compensation on; add images or set prune.compensate=false")
    if distributed.world_size() > 1:
        for name in stats.count:
            stats.count[name] = distributed.all_reduce_sum([stats.count[name]])[0]
            distributed.all_reduce_tensor_(stats.sums[name])
            distributed.all_reduce_tensor_(stats.products[name])
    stats.batches = used
    return stats


def kernel_output_covariance(weight: torch.Tensor, groups: int = 1, autocorrelation: float = 0.0) -> torch.Tensor:
    """The covariance of a conv's output channels predicted from its kernels alone (no data).

    ``weight`` is the conv's ``(O, C/groups, kh, kw)`` kernel (or ``(O, C)`` of a linear layer / 1×1 conv).
    The input is assumed zero-mean with unit variance in every channel, channels independent, and the
    spatial autocorrelation of each channel ``R(Δy, Δx) = ρ^{|Δy|+|Δx|}`` (``ρ = autocorrelation`` in [0, 1):
    0 is white noise; natural images and their feature maps are smooth, ρ ≈ 0.5–0.9).  Then, by the paper's
    identity ⟨F_i, F_j⟩ = ⟨K_i ⋆ K_j, X ⋆ X⟩ (Belmekki et al., arXiv 2411.03226, eq. for a single conv),
    evaluated at one output position,

        Cov(F_i, F_j) = Σ_c Σ_{a, a'} K_ic(a) K_jc(a') R(a − a'),

    zero for filters in different groups (they read different input channels).  Returns ``(O, O)`` float64.
    """
    if not 0.0 <= autocorrelation < 1.0:
        raise ConfigError(f"autocorrelation = {autocorrelation} must be in [0, 1)")
    w = weight.detach().double().cpu()
    if w.dim() == 2:
        w = w[:, :, None, None]
    w = w.reshape(w.shape[0], w.shape[1], w.shape[2], -1) if w.dim() > 4 else w
    kh, kw = w.shape[-2], w.shape[-1]
    lag_h = torch.arange(kh, dtype=torch.float64)
    lag_w = torch.arange(kw, dtype=torch.float64)
    mh = autocorrelation ** (lag_h[:, None] - lag_h[None, :]).abs()
    mw = autocorrelation ** (lag_w[:, None] - lag_w[None, :]).abs()
    if autocorrelation == 0.0:  # 0 ** 0 = 1 on the diagonal, 0 elsewhere
        mh, mw = torch.eye(kh, dtype=torch.float64), torch.eye(kw, dtype=torch.float64)
    smoothed = torch.einsum("ocab,aA,bB->ocAB", w, mh, mw)
    out = w.shape[0]
    cov = torch.zeros(out, out, dtype=torch.float64)
    per = out // groups
    for g in range(groups):
        sl = slice(g * per, (g + 1) * per)
        cov[sl, sl] = torch.einsum("ocab,pcab->op", smoothed[sl], w[sl])
    return cov


def _relu_moments(mean: torch.Tensor, cov: torch.Tensor, samples: int, generator: torch.Generator):
    """``(Σ x, Σ x xᵀ)`` over ``samples`` draws of ``x = relu(z)``, ``z ~ N(mean, cov)`` (float64, seeded)."""
    c = mean.shape[0]
    jitter = 1e-9 * float(cov.diagonal().mean().clamp_min(1e-12))
    chol = torch.linalg.cholesky_ex(cov + jitter * torch.eye(c, dtype=cov.dtype))[0]
    sums = torch.zeros(c, dtype=torch.float64)
    products = torch.zeros(c, c, dtype=torch.float64)
    done = 0
    while done < samples:
        n = min(4096, samples - done)
        z = mean + torch.randn(n, c, dtype=torch.float64, generator=generator) @ chol.T
        x = z.clamp_min(0)
        sums += x.sum(0)
        products += x.T @ x
        done += n
    return sums, products


def predict_input_statistics(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    autocorrelation: float = 0.5,
    samples: int = 16384,
    seed: int = 0,
    max_features: int = MAX_FEATURES,
) -> InputStatistics:
    """Data-free input statistics of every conv (``groups=1``) and linear layer, from the model's weights.

    For each consumer, the channels it reads are traced back (torch-pruning's dependency graph) to the
    batch norms that produce them.  Each batch norm's output is modelled as Gaussian with mean β and
    covariance ``(γγᵀ) ⊙ corr``, where ``corr`` is the correlation of the conv before it predicted from
    its kernels (:func:`kernel_output_covariance`, the paper's identity with an assumed input
    autocorrelation); branches that add into one channel (a residual stream) are summed as independent,
    using those that run before the consumer.  When the consumer's input is non-negative on a probe
    forward pass of ``example_inputs`` (a ReLU before it), the moments are those of ``relu(z)``, estimated
    from ``samples`` seeded Gaussian draws; otherwise the Gaussian's own.  Channels with no batch norm
    behind them (the network's input, a concatenation this does not map) get mean 0, variance 1.

    This is an approximation: nested ReLUs along a residual stream, spatial statistics after pooling and
    non-ReLU activations are not modelled.  Returns :class:`InputStatistics` (``count = samples``) in the
    dense model's channels, usable by :class:`Compensator` in place of :func:`collect_input_statistics`.
    """
    if not 0.0 <= autocorrelation < 1.0:
        raise ConfigError(f"prune.compensation_autocorrelation = {autocorrelation} must be in [0, 1) (0.5 is the default)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order: dict[nn.Module, int] = {}
    nonnegative: dict[nn.Module, bool] = {}
    hooks = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
            def hook(mod, inputs):
                order.setdefault(mod, len(order))
                x = inputs[0]
                if isinstance(x, torch.Tensor) and x.is_floating_point():
                    nonnegative[mod] = nonnegative.get(mod, True) and bool((x >= 0).all())
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.enable_grad(), bounded("building the dependency graph", model):  # torch-pruning traces through autograd
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs.to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    generator = torch.Generator().manual_seed(seed)
    branch_cache: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def branch(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if bn not in branch_cache:
            c = bn.num_features
            corr = torch.eye(c, dtype=torch.float64)
            node = graph.module2node.get(bn)
            conv = node.inputs[0].module if node is not None and len(node.inputs) == 1 else None
            if isinstance(conv, (nn.Linear, nn.modules.conv._ConvNd)) and not getattr(conv, "transposed", False):
                cov = kernel_output_covariance(conv.weight, getattr(conv, "groups", 1), autocorrelation)
                if cov.shape[0] == c:
                    d = cov.diagonal().clamp_min(1e-12).sqrt()
                    corr = cov / torch.outer(d, d)
            gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones(c, dtype=torch.float64)
            beta = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros(c, dtype=torch.float64)
            branch_cache[bn] = (beta, torch.outer(gamma, gamma) * corr)
        return branch_cache[bn]

    stats = InputStatistics()
    for name, module, c in _consumers(model, max_features, stats):
        if module not in order:
            stats.skipped[name] = "not run by the example input"
            continue
        mean = torch.zeros(c, dtype=torch.float64)
        cov = torch.zeros(c, c, dtype=torch.float64)
        covered = torch.zeros(c, dtype=torch.bool)
        fn = graph.get_pruner_of_module(module).prune_in_channels
        with bounded("following this layer's input channels", model):
            group = graph.get_pruning_group(module, fn, idxs=list(range(c)))
        for item in group:
            bn = item.dep.target.module
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or order.get(bn, len(order) + 1) > order[module]:
                continue
            mine = torch.tensor(item.root_idxs, dtype=torch.long)
            theirs = torch.tensor(item.idxs, dtype=torch.long)
            if len(mine) == 0 or int(mine.max()) >= c or int(theirs.max()) >= bn.num_features:
                continue
            m, s = branch(bn)
            mean[mine] += m[theirs]
            cov[mine[:, None], mine[None, :]] += s[theirs][:, theirs]
            covered[mine] = True
        cov[~covered, ~covered] += 1.0
        if nonnegative.get(module, False):
            sums, products = _relu_moments(mean, cov, samples, generator)
        else:
            sums, products = mean * samples, (cov + torch.outer(mean, mean)) * samples
        stats.count[name] = float(samples)
        stats.sums[name] = sums
        stats.products[name] = products
    stats.batches = 0
    return stats


def least_squares(
    stats: InputStatistics, name: str, removed: list[int], kept: list[int], ridge: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine least-squares fit of the removed input channels from the kept ones.

    Returns ``(A, b)``, ``A`` of shape ``(|kept|, |removed|)`` and ``b`` of shape ``(|removed|,)``,
    float64, minimising ``E‖x_P − Aᵀ x_K − b‖² + λ‖A‖²`` over the calibration rows, with
    ``λ = ridge × mean variance of the kept channels`` (so ``ridge`` is scale-free): the normal
    equations on the centred covariance, ``A = (Σ_KK + λI)⁻¹ Σ_KP`` and ``b = μ_P − Aᵀ μ_K``.
    """
    cov, mu = stats.covariance(name), stats.mean(name)
    k, p = torch.tensor(kept, dtype=torch.long), torch.tensor(removed, dtype=torch.long)
    ckk = cov[k][:, k]
    lam = ridge * float(ckk.diagonal().mean().clamp_min(1e-12)) if len(kept) else 0.0
    ckk = ckk + lam * torch.eye(len(kept), dtype=ckk.dtype)
    a = torch.linalg.solve(ckk, cov[k][:, p]) if len(kept) else torch.zeros(0, len(removed), dtype=cov.dtype)
    b = mu[p] - a.T @ mu[k]
    return a, b


@torch.no_grad()
def fold_into_consumer(module: nn.Module, removed: list[int], kept: list[int], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Move the removed input channels' weights onto the kept ones: ``W[:, kept] += W[:, removed] Aᵀ``
    (positions of ``module``'s current input channels; ``A`` as from :func:`least_squares`).

    Returns the constant ``W[:, removed] b`` per output channel, shape ``(out,)``, summed over the kernel
    (what the removed channels' means added to each output); it is added to the bias when the layer has
    one, and returned either way so that a caller can place it elsewhere (a following batch norm)."""
    w = module.weight
    wp = w.detach()[:, removed].double()
    a = a.to(wp.device)
    if isinstance(module, nn.Linear):
        delta = wp @ a.T  # (out, |kept|)
        const = wp @ b.to(wp.device)
    else:
        delta = torch.einsum("op...,kp->ok...", wp, a)
        const = torch.einsum("op...,p->o", wp, b.to(wp.device))
    w.data[:, kept] += delta.to(w.dtype)
    if module.bias is not None:
        module.bias.data += const.to(module.bias.dtype)
    return const


@dataclass
class CompensationReport:
    """What one compensated pruning did: consumers fitted, and consumers of removed channels left as plain
    dropping (name -> reason)."""

    compensated: list[str] = field(default_factory=list)
    left_alone: dict[str, str] = field(default_factory=dict)
    constants_dropped: list[str] = field(default_factory=list)  # no bias and no batch norm after: the constant is lost
    # the dense model's indices of the input / output channels each conv and linear layer kept, for the layers
    # whose channels were pruned (a layer missing here kept all of them); what :func:`refit_to_dense` maps by
    kept_inputs: dict[str, list[int]] = field(default_factory=dict)
    kept_outputs: dict[str, list[int]] = field(default_factory=dict)
    refitted: list[str] = field(default_factory=list)  # layers refitted to the dense model's inputs (refit_to_dense)
    refitted_norms: list[str] = field(default_factory=list)  # batch norms after them, given the dense statistics

    def summary(self) -> str:
        parts = [f"{len(self.compensated)} layers compensated"]
        if self.refitted:
            parts.append(f"{len(self.refitted)} refitted to the dense model's layer inputs")
        if self.left_alone:
            parts.append(f"{len(self.left_alone)} read removed channels uncompensated ("
                         + ", ".join(f"{n}: {r}" for n, r in list(self.left_alone.items())[:3])
                         + (", ..." if len(self.left_alone) > 3 else "") + ")")
        return "; ".join(parts)


class Compensator:
    """Compensates every consumer of a group's removed channels just before torch-pruning removes them.

    Used by :func:`convsim_shrink.prune.search.prune_to_target`: ``bind(model)`` on the copy about to be
    pruned, then ``before_prune(group, graph)`` for every group the pruner yields, in order.  Each
    consumer's current input positions are mapped back to the dense model's channels (earlier groups may
    have removed some of them, e.g. from a concatenation), so the fit always uses the dense model's
    statistics.  ``ridge``: see :func:`least_squares`.
    """

    def __init__(self, stats: InputStatistics, ridge: float = 1e-3):
        if not (ridge >= 0 and math.isfinite(ridge)):
            raise ConfigError(f"prune.compensation_ridge = {ridge} must be a finite number >= 0 (1e-3 is the default)")
        self.stats = stats
        self.ridge = ridge
        self.report = CompensationReport()
        self._names: dict[int, str] = {}

    def bind(self, model: nn.Module) -> None:
        self._names = {id(m): n for n, m in model.named_modules()}
        self.report = CompensationReport()

    def _track_kept(self, group, graph: tp.DependencyGraph) -> None:
        """Record the dense indices of the input and output channels every conv/linear layer keeps after ``group``
        is pruned (positions in a group refer to the layer's current channels: several entries are united first)."""
        gone: dict[tuple[str, str], tuple[int, set[int]]] = {}
        for dep, idxs in group:
            module = dep.target.module
            if not len(idxs) or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                continue
            name = self._names.get(id(module))
            if name is None:
                continue
            linear = isinstance(module, nn.Linear)
            if graph.is_out_channel_pruning_fn(dep.handler):
                side, width = "out", module.out_features if linear else module.out_channels
            elif graph.is_in_channel_pruning_fn(dep.handler):
                side, width = "in", module.in_features if linear else module.in_channels
            else:
                continue
            gone.setdefault((side, name), (width, set()))[1].update(int(i) for i in idxs)
        for (side, name), (width, positions) in gone.items():
            kept = self.report.kept_outputs if side == "out" else self.report.kept_inputs
            alive = kept.setdefault(name, list(range(width)))
            kept[name] = [c for i, c in enumerate(alive) if i not in positions]

    def before_prune(self, group, graph: tp.DependencyGraph) -> None:
        removed_at: dict[str, tuple[nn.Module, set[int]]] = {}
        for dep, idxs in group:
            if not graph.is_in_channel_pruning_fn(dep.handler) or not len(idxs):
                continue
            module = dep.target.module
            if not isinstance(module, nn.Module):
                continue
            name = self._names.get(id(module))
            if name is None:
                continue
            if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                if isinstance(module, _MIXING):  # reads several channels into one: removing one changes it uncompensated
                    self.report.left_alone.setdefault(name, type(module).__name__)
                continue  # batch norms, activations, ...: each channel on its own, nothing to compensate
            if name not in self.stats:
                self.report.left_alone.setdefault(name, self.stats.skipped.get(name, "no statistics"))
                continue
            removed_at.setdefault(name, (module, set()))[1].update(int(i) for i in idxs)
        for name, (module, positions) in removed_at.items():
            width = module.weight.shape[1]
            alive = self.report.kept_inputs.get(name, list(range(width)))
            if len(alive) != width:  # pruned by something this compensator did not see: do not guess
                self.report.left_alone.setdefault(name, "input channels changed outside the compensation")
                continue
            removed = sorted(positions)
            kept = [i for i in range(width) if i not in positions]
            if not kept:
                continue
            a, b = least_squares(self.stats, name, [alive[i] for i in removed], [alive[i] for i in kept], self.ridge)
            const = fold_into_consumer(module, removed, kept, a, b)
            if module.bias is None:
                norm = _following_norm(module, graph)
                if norm is not None:
                    # the layer now outputs y − const; the norm subtracts a mean lowered by the same
                    norm.running_mean.data -= const.to(norm.running_mean.dtype).to(norm.running_mean.device)
                elif bool(const.abs().max() > 0):
                    self.report.constants_dropped.append(name)
            if name not in self.report.compensated:
                self.report.compensated.append(name)
        self._track_kept(group, graph)


class _Joint:
    """Running float64 sums of one layer's input in the pruned model (``x̃``, K channels) and the dense model
    (``x``, C), over rows (images × positions): the count, ``Σ x̃`` (K,), ``Σ x`` (C,), ``Σ x̃ x̃ᵀ`` (K, K) and
    ``Σ x̃ xᵀ`` (K, C)."""

    def __init__(self, k: int, c: int):
        self.count = 0.0
        self.s_pruned, self.s_dense = torch.zeros(k, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        self.pp, self.pd = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, c, dtype=torch.float64)

    def add(self, xp: torch.Tensor, xd: torch.Tensor) -> None:
        xp, xd = xp.double(), xd.double()
        self.s_pruned += xp.sum(0).cpu()
        self.s_dense += xd.sum(0).cpu()
        self.pp += (xp.T @ xp).cpu()
        self.pd += (xp.T @ xd).cpu()
        self.count += xp.shape[0]


def refit_map(joint: _Joint, kept: list[int], ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map from a layer's input in the pruned model to its input in the dense model.

    ``x ≈ Bᵀ x̃ + d`` with ``B`` of shape ``(K, C)`` and ``d`` of shape ``(C,)``: least squares over the
    calibration rows, with the ridge pulling ``B`` towards the identity embedding ``E`` (``E[k, kept[k]] = 1``:
    the pruned model's channel k *is* the dense model's channel ``kept[k]``) rather than towards zero, so a
    layer whose input did not change is left exactly as it is:
    ``B = E + (Σ̃ + λI)⁻¹ Cov(x̃, x − Eᵀx̃)``, ``d = μ − Bᵀ μ̃``, ``λ = ridge ×`` the mean variance of ``x̃`` (at least 1e-9 × it).
    For the removed channels' columns this is :func:`least_squares`'s fit, for the kept ones a correction
    for what pruning upstream changed in them.
    """
    n = joint.count
    mp, md = joint.s_pruned / n, joint.s_dense / n
    cpp = joint.pp / n - torch.outer(mp, mp)
    cpd = joint.pd / n - torch.outer(mp, md)
    k = len(kept)
    idx = torch.tensor(kept, dtype=torch.long)
    embed = torch.zeros(k, md.numel(), dtype=torch.float64)
    embed[torch.arange(k), idx] = 1.0
    resid = cpd - cpp @ embed  # Cov(x̃, x − Eᵀx̃)
    # a floor far below any ridge keeps a channel that never varies (a dead ReLU) from making the system singular
    lam = max(ridge, 1e-9) * float(cpp.diagonal().mean().clamp_min(1e-12))
    b = embed + torch.linalg.solve(cpp + lam * torch.eye(k, dtype=cpp.dtype), resid)
    return b, md - b.T @ mp


class _Reached(Exception):
    """Stops a forward pass once the layer of interest has been given its input."""


def _input_rows(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s input as rows when ``model`` runs on ``x`` (the forward stops there)."""
    got = []

    def hook(mod, inputs):
        got.append(_rows(mod, inputs[0].detach()))
        raise _Reached

    handle = layer.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not got:
        raise ConfigError(f"the forward pass never reached {type(layer).__name__}: it cannot be refitted")
    return got[0]


def _sample(rows: torch.Tensor, max_rows: int | None, layer_index: int, batch_index: int) -> torch.Tensor:
    """At most ``max_rows`` rows, the same ones for the same layer, batch and row count (as the statistics sample)."""
    if max_rows is not None and rows.shape[0] > max_rows:
        g = torch.Generator().manual_seed(1_000_003 * layer_index + batch_index)
        rows = rows[torch.randperm(rows.shape[0], generator=g)[:max_rows].to(rows.device)]
    return rows


def _dense_rows(dense: nn.Module, layers: dict[str, nn.Module], xs: list[torch.Tensor], max_rows: int | None,
                budget: int) -> dict[tuple[str, int], torch.Tensor]:
    """The dense model's sampled input rows of ``layers`` (name -> layer, in execution order) for every batch,
    from one forward pass per batch, kept while they fit in ``budget`` bytes (the dense model does not change,
    so its inputs need no pass per layer; layers past the budget are measured layer by layer instead)."""
    kept: dict[tuple[str, int], torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    used = [0]
    batch = [0]
    hooks = []
    for layer_index, (name, layer) in enumerate(layers.items()):
        def hook(mod, inputs, name=name, layer_index=layer_index):
            if (name, batch[0]) in seen:
                return  # a layer run twice: its first input, as the layer-by-layer measurement takes
            seen.add((name, batch[0]))
            rows = _sample(_rows(mod, inputs[0].detach()), max_rows, layer_index, batch[0])
            size = rows.numel() * rows.element_size()
            if used[0] + size <= budget:
                kept[(name, batch[0])] = rows.clone()
                used[0] += size
        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        for batch[0], x in enumerate(xs):
            dense(x)
    finally:
        for h in hooks:
            h.remove()
    return kept


def _execution_order(model: nn.Module, layers: dict, x: torch.Tensor) -> tuple[list[str], dict[str, str]]:
    """The order in which ``model`` runs ``layers`` on ``x``, and the batch norm (by name) that reads each one's
    output, where one does (found by tagging the layer's output tensor)."""
    order: list[str] = []
    norm_after: dict[str, str] = {}
    hooks = []
    for name, (module, *_) in layers.items():
        def first(mod, inputs, name=name):
            if name not in order:
                order.append(name)

        def tag(mod, inputs, output, name=name):
            if isinstance(output, torch.Tensor):
                output._convsim_layer = name

        hooks += [module.register_forward_pre_hook(first), module.register_forward_hook(tag)]
    for bn_name, bn in model.named_modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats and bn.running_mean is not None:
            def on_norm(mod, inputs, bn_name=bn_name):
                layer = getattr(inputs[0], "_convsim_layer", None)
                if layer is not None:
                    norm_after.setdefault(layer, bn_name)
            hooks.append(bn.register_forward_pre_hook(on_norm))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return order, norm_after


def _refit_layer(module, ref, kout, b, d, norm_name, model, dense, report, name) -> None:
    """``module`` becomes ``ref`` (its kept output rows) composed with the map ``x ≈ Bᵀ x̃ + d``; the constant
    goes to the bias, else to the running mean of the batch norm after it.  That norm gets the dense norm's
    statistics (its mean lowered by the constant when the layer has no bias): the layer now computes the dense
    layer's output, so the dense normalisation is the one that fits it."""
    w = ref.weight.detach()[kout].double().cpu()
    if isinstance(module, nn.Linear):
        new, const = w @ b.T, w @ d
    else:
        new, const = torch.einsum("oc...,kc->ok...", w, b), torch.einsum("oc...,c->o", w, d)
    module.weight.data.copy_(new.to(module.weight.dtype))
    shift = const
    if module.bias is not None:
        base = ref.bias.detach()[kout].double().cpu() if ref.bias is not None else 0.0
        module.bias.data.copy_((base + const).to(module.bias.dtype))
        shift = torch.zeros_like(const)
    norm = model.get_submodule(norm_name) if norm_name is not None else None
    dense_norm = dense.get_submodule(norm_name) if norm_name is not None else None
    if (norm is not None and norm.running_mean.shape[0] == len(kout)
            and dense_norm.running_mean.shape[0] == ref.weight.shape[0]):
        # the layer outputs (dense output − shift): the norm subtracts the dense mean lowered by the same
        rm = dense_norm.running_mean.detach()[kout].double().cpu() - shift
        norm.running_mean.data.copy_(rm.to(norm.running_mean.dtype))
        norm.running_var.data.copy_(dense_norm.running_var.detach()[kout].to(norm.running_var.dtype))
        if norm_name not in report.refitted_norms:
            report.refitted_norms.append(norm_name)
    elif module.bias is None and bool(const.abs().max() > 0) and name not in report.constants_dropped:
        report.constants_dropped.append(name)


@torch.no_grad()
def refit_to_dense(
    model: nn.Module,
    dense: nn.Module,
    report: CompensationReport,
    loader: Iterable,
    batches: int,
    *,
    ridge: float = 1e-3,
    max_rows: int | None = MAX_ROWS,
    max_features: int = MAX_FEATURES,
    prec: Precision | None = None,
    cache_bytes: int = 1 << 30,
) -> list[str]:
    """Refit every conv (``groups=1``) and linear layer of the pruned ``model`` so that, fed what the pruned
    model feeds it, it computes what the dense layer computes on the dense model's input.

    Compensation (:class:`Compensator`) fits each removed channel from the kept ones *as the dense model
    computes them*; after pruning upstream, the kept channels themselves differ, and the error grows with
    depth.  Here each layer's input in the pruned model ``x̃`` (``K`` channels) and in the dense model ``x``
    (``C``) are measured together on the same ``batches`` training batches (eval mode, both models), the map
    ``x ≈ Bᵀ x̃ + d`` is fitted (:func:`refit_map`), and the layer becomes the dense layer composed with it:
    ``W ← W_dense[kept outputs] · Bᵀ`` per kernel position (a conv is linear in its input channels), and the
    constant ``W_dense d`` goes to the bias, or to the running mean of the batch norm that reads the layer
    (that norm gets the dense norm's statistics, the mean lowered by the constant, so its output is the dense
    one's; they are listed in ``report.refitted_norms``, and batch-norm re-estimation leaves them alone: it
    would normalise the fitted outputs to their own, smaller, variance).  This is the reconstruction step of He et
    al., "Channel Pruning for Accelerating Very Deep Neural Networks" (ICCV 2017): the pruned network's
    inputs against the original network's outputs, here through the inputs so that any kernel size works.

    The layers are refitted one at a time in the order the model runs them, each on its input as the layers
    before it, already refitted, now compute it (refitting them all from one pass, each against an upstream
    that then changes, made deep layers' errors grow without bound); each layer's measurement stops the pruned
    model's forward pass at that layer, so the whole costs about ``layers / 2`` forward passes of the pruned
    model per batch (the batches are read once and kept); the dense model's inputs are measured once, in one
    pass per batch, and kept up to ``cache_bytes`` (beyond it, layer by layer as the pruned model's).  ``report`` is the compensation's
    (:class:`CompensationReport`): its ``kept_inputs`` / ``kept_outputs`` map the pruned layers' channels to
    the dense ones; layers are matched by name; one whose widths do not match is left alone and listed in
    ``report.left_alone``.  Returns the names of the layers refitted (also added to ``report.refitted``).
    Rows are sampled as :func:`collect_input_statistics` samples them (the same rows of both models); under
    ``torchrun`` the sums are all-reduced, so every rank refits identically.  Raises
    :class:`~convsim_shrink.errors.ConfigError` when the loader gives no batch.
    """
    if max_rows is not None and max_rows < 1:
        raise ConfigError(f"max_rows = {max_rows} must be at least 1 (or None: every row)")
    device = next(model.parameters()).device
    prec = prec or resolve_precision(device, "fp32", None)
    dense_modules = dict(dense.named_modules())
    layers: dict[str, tuple[nn.Module, nn.Module, list[int], list[int]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or _consumer_kind(module, max_features):
            continue
        ref = dense_modules.get(name)
        if type(ref) is not type(module):
            report.left_alone.setdefault(name, "no layer of that name in the dense model")
            continue
        linear = isinstance(module, nn.Linear)
        c_in, c_out = (ref.in_features, ref.out_features) if linear else (ref.in_channels, ref.out_channels)
        kin = report.kept_inputs.get(name, list(range(c_in)))
        kout = report.kept_outputs.get(name, list(range(c_out)))
        if len(kin) != module.weight.shape[1] or len(kout) != module.weight.shape[0]:
            report.left_alone.setdefault(name, "its channels do not map onto the dense layer's")
            continue
        layers[name] = (module, ref, kin, kout)
    modes = (model.training, dense.training)
    model.eval()
    dense.eval()
    try:
        xs = [x.float() if x.is_floating_point() else x for x, _ in first_batches(loader, batches, prec)]
        if not xs:
            raise ConfigError("the training data gave no batch to refit the pruned model on; add images or set prune.compensation_refit=0")
        order, norm_after = _execution_order(model, layers, xs[0])
        cached = _dense_rows(dense, {name: layers[name][1] for name in order}, xs, max_rows, cache_bytes)
        refitted = []
        for layer_index, name in enumerate(order):
            module, ref, kin, kout = layers[name]
            joint = _Joint(len(kin), ref.weight.shape[1])
            for batch_index, x in enumerate(xs):
                mine = _sample(_input_rows(model, module, x), max_rows, layer_index, batch_index)
                theirs = cached.pop((name, batch_index), None)
                if theirs is None:
                    theirs = _sample(_input_rows(dense, ref, x), max_rows, layer_index, batch_index)
                if mine.shape[0] == theirs.shape[0]:
                    joint.add(mine, theirs)
            if distributed.world_size() > 1:
                joint.count = distributed.all_reduce_sum([joint.count])[0]
                for t in (joint.s_pruned, joint.s_dense, joint.pp, joint.pd):
                    distributed.all_reduce_tensor_(t)
            if not joint.count:
                report.left_alone.setdefault(name, "its input differs in shape from the dense layer's")
                continue
            _refit_layer(module, ref, kout, *refit_map(joint, kin, ridge), norm_after.get(name), model, dense, report, name)
            refitted.append(name)
        for name in layers:
            if name not in order:
                report.left_alone.setdefault(name, "not run by the model's forward pass")
    finally:
        model.train(modes[0])
        dense.train(modes[1])
    report.refitted = list(dict.fromkeys(report.refitted + refitted))
    return refitted


def _following_norm(module: nn.Module, graph: tp.DependencyGraph) -> nn.Module | None:
    """The batch norm (with running statistics) that reads ``module``'s output and nothing else does, if any."""
    node = graph.module2node.get(module)
    if node is None or len(node.outputs) != 1:
        return None
    nxt = node.outputs[0].module
    if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.track_running_stats and nxt.running_mean is not None:
        return nxt
    return None


__all__ = [
    "CompensationReport", "Compensator", "InputStatistics", "collect_input_statistics", "fold_into_consumer",
    "kernel_output_covariance", "least_squares", "predict_input_statistics", "refit_map", "refit_to_dense",
]
