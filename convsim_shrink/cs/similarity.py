"""Convolutional Similarity (CS): the paper's object, exact and fast.

For a conv weight ``W`` of shape ``(M, C, k_1, ..., k_d)`` (d = 1, 2 or 3) the *full* cross-correlation
of two kernels, ``W[i,c] ⋆ W[j,c']``, has ``2k-1`` shifts per axis.  The inner product of two output
feature maps is ``<F_i, F_j> = Σ_{c,c'} <W[i,c] ⋆ W[j,c'], X_c ⋆ X_c'>`` (Belmekki et al., 2024,
arXiv:2411.03226), so driving every shift to zero makes the feature maps orthogonal for any input;
kernel orthogonality only controls the zero shift.

How it is computed
------------------
By the correlation theorem and Parseval, with zero-padding to ``n = 2k-1`` per axis (long enough that
circular correlation equals linear correlation)::

    ||a ⋆ b||² = (1/N) Σ_f |â(f)|² |b̂(f)|²,     N = Π n_d

so with the power spectra ``P[i,c,f] = |Ŵ[i,c](f)|²``, every form is a sum of products of spectra, and
the all-pairs sums collapse with ``Σ_{i<j} a_i a_j = ((Σ a_i)² - Σ a_i²) / 2`` into time *linear* in
``M``.  Kernels are tiny, so the DFT is a single real matrix product (``(Πk) -> 2F`` real columns)
instead of an FFT call; because every ``n`` is odd, the half spectrum of the last axis carries all the
information (weights 1 for the zero frequency, 2 for the others).

Grouped and depthwise convolutions are handled, not refused: pass ``groups`` (``model_conv_similarity``
reads it from the module).  Only filters of the same group see the same input channels, so only pairs
inside one group are counted; a depthwise conv (one filter per group) has no pairs and a CS of zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache

import torch
from torch import nn

__all__ = [
    "conv_similarity",
    "pairwise_similarity",
    "model_conv_similarity",
    "layer_similarities",
    "conv_layers",
    "conv_similarity_reference",
]

PAIRS = ("all", "adjacent")
CHANNELS = ("same", "cross")
_EPS = 1e-12


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not accepted; use one of {', '.join(map(repr, choices))}")


def _check_weight(weight: torch.Tensor, groups: int) -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"expected a conv weight tensor, got {type(weight).__name__}")
    if weight.dim() not in (3, 4, 5):
        raise ValueError(
            f"expected a conv weight of shape (out, in, k) or (out, in, kh, kw) or (out, in, kd, kh, kw), "
            f"got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise ValueError(f"conv weight must be floating point, got {weight.dtype}")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups={groups} does not divide the {weight.shape[0]} output channels")


def _unit_filters(weight: torch.Tensor) -> torch.Tensor:
    """Every filter (all of its input channels and taps) scaled to unit L2 norm."""
    norms = weight.reshape(weight.shape[0], -1).norm(dim=1).clamp_min(_EPS)
    return weight / norms.view(-1, *([1] * (weight.dim() - 1)))


@lru_cache(maxsize=64)
def _dft_basis_cpu(kernel: tuple[int, ...]) -> torch.Tensor:
    """Real DFT basis in float64 for zero-padding to ``2k-1`` per axis.

    Returned as ``(2, Πk, F)``: cosine (real) and sine (imaginary) parts.  Columns are scaled by
    ``(w_f / N) ** 0.25`` so that squaring the product and summing products of
    squares gives ``(1/N) Σ_f w_f |â|²|b̂|²`` directly (``w_f`` = 1 or 2 for the half spectrum).
    """
    n = [2 * k - 1 for k in kernel]
    d = len(kernel)
    pos = torch.cartesian_prod(*[torch.arange(k, dtype=torch.float64) for k in kernel]).reshape(-1, d)
    # full spectrum on every axis but the last, half spectrum (0..k-1 of 2k-1) on the last
    freq_ranges = [torch.arange(m, dtype=torch.float64) for m in n[:-1]] + [torch.arange(kernel[-1], dtype=torch.float64)]
    freqs = torch.cartesian_prod(*freq_ranges).reshape(-1, d)
    n_t = torch.tensor(n, dtype=torch.float64)
    phase = 2 * math.pi * (pos / n_t) @ freqs.T  # (Πk, F): 2π Σ_d a_d f_d / n_d
    weight = torch.where(freqs[:, -1] == 0, 1.0, 2.0).to(torch.float64)
    scale = (weight / math.prod(n)) ** 0.25
    return torch.stack([torch.cos(phase) * scale, torch.sin(phase) * scale])  # (2, Πk, F)


def _dft_basis(kernel: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _dft_basis_cpu(kernel).to(device=device, dtype=dtype)


def _power_spectra(weight: torch.Tensor, normalized: bool) -> torch.Tensor:
    """Scaled power spectra ``P`` of shape ``(M, C, F)``; ``Σ_f P_a P_b = ||a ⋆ b||²``."""
    m, c = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    if normalized:
        weight = _unit_filters(weight)
    basis = _dft_basis(kernel, weight.dtype, weight.device)
    flat = weight.reshape(m * c, -1)
    re, im = flat @ basis[0], flat @ basis[1]
    return torch.addcmul(re * re, im, im).reshape(m, c, -1)


# Rows of (filter, input channel) kernels processed per block by the fused all-pairs path: the block's
# spectra stay in cache instead of streaming the whole layer's spectra through memory several times.
_BLOCK_ROWS = 16384


class _AllPairsCS(torch.autograd.Function):
    """Σ_{i<j} of the same- or cross-channel CS for ``groups == 1``, in blocks of whole filters.

    Forward keeps only the per-frequency totals ``S`` (``(C, F)`` same, ``(F,)`` cross); backward
    recomputes each block's spectra and uses ``dCS/dP_i = S - P_i`` directly, so no spectrum of the
    whole layer is ever stored.
    """

    @staticmethod
    def forward(ctx, weight, basis_re, basis_im, cross: bool):
        m, c = weight.shape[:2]
        rows = weight.reshape(m, c, -1)
        step = max(1, _BLOCK_ROWS // c)
        n_freq = basis_re.shape[1]
        totals = weight.new_zeros(n_freq if cross else (c, n_freq))
        squares = weight.new_zeros(())
        for start in range(0, m, step):
            block = rows[start : start + step].reshape(-1, rows.shape[-1])
            re, im = block @ basis_re, block @ basis_im
            power = torch.addcmul(re * re, im, im).reshape(-1, c, n_freq)
            if cross:
                power = power.sum(1)
            totals += power.sum(0)
            flat = power.reshape(-1)
            squares += flat @ flat
        ctx.save_for_backward(weight, basis_re, basis_im, totals)
        ctx.cross = cross
        flat_totals = totals.reshape(-1)
        return 0.5 * (flat_totals @ flat_totals - squares)

    @staticmethod
    def backward(ctx, grad):
        weight, basis_re, basis_im, totals = ctx.saved_tensors
        m, c = weight.shape[:2]
        rows = weight.reshape(m, c, -1)
        step = max(1, _BLOCK_ROWS // c)
        n_freq = basis_re.shape[1]
        back_re, back_im = (2 * grad) * basis_re.T, (2 * grad) * basis_im.T
        grad_rows = torch.empty_like(rows)
        for start in range(0, m, step):
            block = rows[start : start + step].reshape(-1, rows.shape[-1])
            re, im = block @ basis_re, block @ basis_im
            power = torch.addcmul(re * re, im, im).reshape(-1, c, n_freq)
            if ctx.cross:
                grad_power = (totals - power.sum(1)).unsqueeze(1).expand(-1, c, -1)
            else:
                grad_power = totals - power
            grad_power = grad_power.reshape(-1, n_freq)
            out = torch.mm(grad_power * re, back_re)
            out.addmm_(grad_power * im, back_im)
            grad_rows[start : start + step] = out.reshape(-1, c, rows.shape[-1])
        return grad_rows.reshape(weight.shape), None, None, None


def conv_similarity(
    weight: torch.Tensor,
    *,
    pairs: str = "all",
    channels: str = "same",
    normalized: bool = False,
    groups: int = 1,
) -> torch.Tensor:
    """Convolutional Similarity of one conv weight, a differentiable scalar.

    Args:
        weight: ``(M, C, k)``, ``(M, C, kh, kw)`` or ``(M, C, kd, kh, kw)`` (``C`` = in channels / groups).
        pairs: ``"all"`` sums over every pair ``i < j``; ``"adjacent"`` only over ``(i, i+1)``, as the
            paper's public code does.
        channels: ``"same"`` sums ``||W[i,c] ⋆ W[j,c]||²`` over input channels ``c``; ``"cross"`` sums
            ``||W[i,c] ⋆ W[j,c']||²`` over every ``(c, c')``: every term of ``<F_i, F_j>`` for a
            multi-channel input, so zero means orthogonal feature maps for any input.
        normalized: compute on filters scaled to unit norm, so the value does not fall merely because
            the weights shrink.
        groups: the conv's ``groups``; only pairs inside one group count (depthwise: zero).

    Cost is linear in ``M`` (power spectra, then sums of squares).  ``pairs="all"`` without groups runs a
    fused, blocked kernel with an analytic backward; the other forms use plain autograd.
    """
    _check_choice("pairs", pairs, PAIRS)
    _check_choice("channels", channels, CHANNELS)
    _check_weight(weight, groups)
    if pairs == "all" and groups == 1:
        if normalized:
            weight = _unit_filters(weight)
        basis = _dft_basis(tuple(weight.shape[2:]), weight.dtype, weight.device)
        return _AllPairsCS.apply(weight, basis[0], basis[1], channels == "cross")
    power = _power_spectra(weight, normalized)  # (M, C, F)
    m = weight.shape[0]
    power = power.reshape(groups, m // groups, *power.shape[1:])  # (G, M/G, C, F)
    if channels == "cross":
        power = power.sum(dim=2, keepdim=True)  # Σ_c P[i,c] : products then cover every (c, c')
    if pairs == "adjacent":
        return (power[:, :-1] * power[:, 1:]).sum()
    total = power.sum(dim=1).reshape(-1)
    flat = power.reshape(-1)
    # Σ_{i<j} a_i a_j = ((Σ a_i)² - Σ a_i²) / 2, as dot products: one pass each way
    return 0.5 * (total @ total - flat @ flat)


def pairwise_similarity(
    weight: torch.Tensor,
    *,
    channels: str = "same",
    normalized: bool = True,
    groups: int = 1,
) -> torch.Tensor:
    """The ``(M, M)`` matrix of pairwise Convolutional Similarities.

    Entry ``(i, j)`` is ``Σ_c ||W[i,c] ⋆ W[j,c]||²`` (or the cross-channel sum); the diagonal holds each
    filter's similarity with itself.  With ``groups > 1`` pairs from different groups (which never see the
    same input) are zero.  The strict upper triangle sums to :func:`conv_similarity`.
    """
    _check_choice("channels", channels, CHANNELS)
    _check_weight(weight, groups)
    power = _power_spectra(weight, normalized)
    if channels == "cross":
        power = power.sum(dim=1, keepdim=True)
    flat = power.reshape(power.shape[0], -1)
    m = weight.shape[0]
    if groups == 1:
        return flat @ flat.T
    per = m // groups
    blocks = flat.reshape(groups, per, -1)
    return torch.block_diag(*(blocks @ blocks.transpose(1, 2)).unbind(0))


def conv_layers(model: nn.Module) -> Iterator[tuple[str, nn.modules.conv._ConvNd]]:
    """Every (non-transposed) 1-D, 2-D and 3-D convolution of ``model``, with its name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            yield name, module


LayerWeight = Callable[[str, nn.Module], float] | Mapping[str, float] | None


def _layer_factor(layer_weight: LayerWeight, name: str, module: nn.Module) -> float:
    if layer_weight is None:
        return 1.0
    if callable(layer_weight):
        return float(layer_weight(name, module))
    return float(layer_weight.get(name, 1.0))


def layer_similarities(model: nn.Module, **options) -> dict[str, torch.Tensor]:
    """CS of every conv layer of ``model`` by name (same options as :func:`conv_similarity`)."""
    return {
        name: conv_similarity(module.weight, groups=module.groups, **options)
        for name, module in conv_layers(model)
    }


def model_conv_similarity(
    model: nn.Module,
    *,
    pairs: str = "all",
    channels: str = "same",
    normalized: bool = False,
    layer_weight: LayerWeight = None,
    skip_depthwise: bool = True,
) -> torch.Tensor:
    """Σ over the model's conv layers of ``factor(layer) * CS(layer)``.

    ``layer_weight`` weights or skips layers: a mapping from module name to factor (missing = 1), or a
    callable ``(name, module) -> factor``; a factor of 0 skips the layer without computing it.
    Depthwise convs (CS identically zero) are skipped unless ``skip_depthwise=False``.
    """
    total: torch.Tensor | None = None
    for name, module in conv_layers(model):
        if skip_depthwise and module.groups == module.out_channels:
            continue
        factor = _layer_factor(layer_weight, name, module)
        if factor == 0.0:
            continue
        value = conv_similarity(
            module.weight, pairs=pairs, channels=channels, normalized=normalized, groups=module.groups
        )
        value = value * factor if factor != 1.0 else value
        total = value if total is None else total + value
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


def conv_similarity_reference(
    weight: torch.Tensor,
    *,
    pairs: str = "all",
    channels: str = "same",
    normalized: bool = False,
    groups: int = 1,
) -> torch.Tensor:
    """The direct form, ``O(M² C k^{2d})`` (``O(M² C² k^{2d})`` cross): every kernel pair correlated
    explicitly with a convolution padded by ``k-1``.  Slow and obviously correct; used by the tests and
    the benchmark as the reference, never by the pipeline."""
    _check_choice("pairs", pairs, PAIRS)
    _check_choice("channels", channels, CHANNELS)
    _check_weight(weight, groups)
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[
        weight.dim()
    ]
    m, c = weight.shape[:2]
    kernel = weight.shape[2:]
    if normalized:
        weight = _unit_filters(weight)
    padding = tuple(k - 1 for k in kernel)
    per = m // groups
    total = weight.new_zeros(())
    for g in range(groups):
        w = weight[g * per : (g + 1) * per]
        # corr[i, j] = w[i, a] ⋆ w[j, b] for the channel pairs (a, b) the form asks for
        channel_pairs = [(a, a) for a in range(c)] if channels == "same" else [(a, b) for a in range(c) for b in range(c)]
        for a, b in channel_pairs:
            corr = conv(w[:, a : a + 1], w[:, b : b + 1], padding=padding)  # (per, per, 2k-1, ...)
            energy = corr.square().flatten(2).sum(-1)  # energy[i, j] = ||w[i,a] ⋆ w[j,b]||²
            if pairs == "all":
                total = total + torch.triu(energy, diagonal=1).sum()
            else:
                total = total + torch.diagonal(energy, offset=1).sum()
    return total
