"""The Convolutional Similarity core against slow, obviously-correct references."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convsim_shrink import (
    conv_similarity,
    conv_similarity_reference,
    layer_similarities,
    model_conv_similarity,
    pairwise_similarity,
)

SHAPES = [
    (4, 3, 3, 3),  # the usual 3x3
    (5, 2, 5, 5),  # k = 5
    (3, 2, 3, 5),  # non-square
    (2, 1, 1, 1),  # k = 1, M = 2, C = 1
    (6, 3, 4),  # 1-D, even k
    (3, 2, 2, 3, 2),  # 3-D
    (7, 1, 3, 3),  # C = 1
]
FORMS = list(itertools.product(["all", "adjacent"], ["same", "cross"], [False, True]))


def _xcorr_loops(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Full cross-correlation of two 1-D or 2-D kernels by explicit loops over every shift."""
    if a.dim() == 1:
        a, b = a[None], b[None]
    (ha, wa), (hb, wb) = a.shape, b.shape
    out = torch.zeros(ha + hb - 1, wa + wb - 1, dtype=a.dtype)
    for sy in range(-(ha - 1), hb):
        for sx in range(-(wa - 1), wb):
            acc = a.new_zeros(())
            for y in range(ha):
                for x in range(wa):
                    if 0 <= y + sy < hb and 0 <= x + sx < wb:
                        acc = acc + a[y, x] * b[y + sy, x + sx]
            out[sy + ha - 1, sx + wa - 1] = acc
    return out


def _cs_loops(w, pairs, channels, normalized):
    """CS straight from its definition: Σ over pairs and channel pairs of ||W_i,c ⋆ W_j,c'||²."""
    if normalized:
        w = w / w.flatten(1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))
    m, c = w.shape[:2]
    pair_list = [(i, j) for i in range(m) for j in range(i + 1, m)] if pairs == "all" else [(i, i + 1) for i in range(m - 1)]
    chans = [(a, a) for a in range(c)] if channels == "same" else list(itertools.product(range(c), range(c)))
    total = w.new_zeros(())
    for i, j in pair_list:
        for a, b in chans:
            total = total + _xcorr_loops(w[i, a], w[j, b]).square().sum()
    return total


@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) <= 4 and s[0] * s[1] <= 12])
@pytest.mark.parametrize("pairs,channels,normalized", FORMS)
def test_reference_matches_definition_by_loops(shape, pairs, channels, normalized):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64)
    expected = _cs_loops(w, pairs, channels, normalized)
    got = conv_similarity_reference(w, pairs=pairs, channels=channels, normalized=normalized)
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pairs,channels,normalized", FORMS)
def test_fast_form_equals_direct_form(shape, pairs, channels, normalized):
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=torch.float64)
    fast = conv_similarity(w, pairs=pairs, channels=channels, normalized=normalized)
    ref = conv_similarity_reference(w, pairs=pairs, channels=channels, normalized=normalized)
    assert abs(fast.item() - ref.item()) / abs(ref.item()) < 1e-9


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (3, 2, 3, 5), (5, 2, 4)])
@pytest.mark.parametrize("pairs,channels,normalized", FORMS)
def test_gradients_match_direct_form(shape, pairs, channels, normalized):
    torch.manual_seed(2)
    w1 = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_(True)
    conv_similarity(w1, pairs=pairs, channels=channels, normalized=normalized).backward()
    conv_similarity_reference(w2, pairs=pairs, channels=channels, normalized=normalized).backward()
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pairs,channels,normalized", FORMS)
def test_gradcheck(pairs, channels, normalized):
    torch.manual_seed(3)
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: conv_similarity(t, pairs=pairs, channels=channels, normalized=normalized), (w,)
    )


def test_float32_close_to_float64():
    torch.manual_seed(4)
    w = torch.randn(64, 32, 3, 3, dtype=torch.float64)
    exact = conv_similarity(w)
    single = conv_similarity(w.float())
    assert single.dtype == torch.float32
    assert abs(single.item() - exact.item()) / exact.item() < 1e-4


def _circular_feature_maps(x, w):
    """Conv (PyTorch's cross-correlation convention) with circular padding: output size = input size."""
    kh, kw = w.shape[-2:]
    padded = F.pad(x[None], (0, kw - 1, 0, kh - 1), mode="circular")
    return F.conv2d(padded, w)[0]


@pytest.mark.parametrize("seed", range(3))
def test_paper_identity_feature_inner_product_is_kernel_xcorr_against_input_autocorr(seed):
    """<F_i, F_j> = Σ_{c,c'} <K_i,c ⋆ K_j,c', X_c ⋆ X_c'> with the input's circular autocorrelation."""
    g = torch.Generator().manual_seed(seed)
    c, k, n = 3, 3, 9
    w = torch.randn(4, c, k, k, dtype=torch.float64, generator=g)
    x = torch.randn(c, n, n, dtype=torch.float64, generator=g)
    fmaps = _circular_feature_maps(x, w)
    for i, j in [(0, 1), (1, 3), (2, 2)]:
        lhs = (fmaps[i] * fmaps[j]).sum()
        rhs = x.new_zeros(())
        for a in range(c):
            for b in range(c):
                kx = _xcorr_loops(w[i, a], w[j, b])  # index s + (k-1): Σ_u K_i[u] K_j[u+s]
                for sy in range(-(k - 1), k):
                    for sx in range(-(k - 1), k):
                        # circular autocorrelation R_ab[s] = Σ_x X_a[x] X_b[x+s]
                        r = (x[a] * torch.roll(x[b], shifts=(-sy, -sx), dims=(0, 1))).sum()
                        rhs = rhs + kx[sy + k - 1, sx + k - 1] * r
        assert torch.allclose(lhs, rhs, rtol=1e-10)


def _cosine(a, b):
    return ((a * b).sum() / (a.norm() * b.norm())).item()


def test_orthogonal_kernels_can_give_correlated_feature_maps_while_cs_bounds_them():
    """Kernel orthogonality controls only the zero shift: two orthogonal kernels that are shifted copies
    of each other give almost identical feature maps on smooth inputs.  CS controls every shift:
    |<F_i,F_j>| <= Σ_{c,c'} ||K_i,c ⋆ K_j,c'|| ||X_c ⋆ X_c'||, so small CS means uncorrelated maps for any
    input.  (Exactly zero cross-channel CS needs a zero filter: the cross-correlation of two non-zero
    finite kernels is never identically zero, so CS is a quantity to minimise, not to reach.)"""
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    w[0, 0, 1, 1] = 1.0
    w[1, 0, 1, 2] = 1.0  # the same kernel shifted by one pixel
    assert (w[0] * w[1]).sum().item() == 0.0  # orthogonal kernels (exact: every product has a zero factor)
    smooth = F.avg_pool2d(torch.randn(1, 1, 36, 36, dtype=torch.float64, generator=g), 5, 1)[0]
    fmaps = _circular_feature_maps(smooth, w)
    assert _cosine(fmaps[0], fmaps[1]) > 0.5  # ...yet strongly correlated feature maps
    assert conv_similarity(w, channels="cross").item() == pytest.approx(1.0)  # CS sees the shift

    # Minimising cross-channel CS (unit-norm filters) drives feature-map correlation down for every input.
    v = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    opt = torch.optim.Adam([v], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        conv_similarity(v, channels="cross", normalized=True).backward()
        opt.step()
    u = (v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).detach()
    cs_pairs = {
        (a, b): _xcorr_loops(u[0, a], u[1, b]).square().sum().sqrt() for a in range(3) for b in range(3)
    }
    for seed in range(5):
        x = torch.randn(3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        fm = _circular_feature_maps(x, u)
        inner = (fm[0] * fm[1]).sum().abs()
        bound = sum(
            cs_pairs[a, b] * torch.stack(
                [(x[a] * torch.roll(x[b], (-sy, -sx), (0, 1))).sum() for sy in range(-2, 3) for sx in range(-2, 3)]
            ).norm()
            for a in range(3)
            for b in range(3)
        )
        assert inner <= bound + 1e-9
    start = conv_similarity(torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g), channels="cross", normalized=True)
    assert conv_similarity(u, channels="cross", normalized=True) < 0.1 * start


def _quartic_scale(w: torch.Tensor) -> float:
    """The size of a CS of ``w`` (CS is quartic in the weights): round-off in one is a multiple of this."""
    return w.square().sum().item() ** 2


def test_cross_channel_zero_when_a_filter_is_zero_gives_orthogonal_maps():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g)
    w[1] = 0
    # the fast form sums all pairs as ((Σa)² - Σa²)/2: zero up to cancellation, not exactly
    assert abs(conv_similarity(w, channels="cross").item()) <= 1e-12 * _quartic_scale(w)
    x = torch.randn(2, 10, 10, dtype=torch.float64, generator=g)
    fm = _circular_feature_maps(x, w)
    assert abs((fm[0] * fm[1]).sum().item()) <= 1e-12 * fm[0].norm().item() * x.norm().item() * w.norm().item()


@pytest.mark.parametrize("channels", ["same", "cross"])
@pytest.mark.parametrize("pairs", ["all", "adjacent"])
def test_normalized_is_invariant_to_rescaling_filters(pairs, channels):
    torch.manual_seed(5)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    scales = torch.tensor([0.01, 3.0, -2.0, 1.0, 250.0, 0.5], dtype=torch.float64).view(-1, 1, 1, 1)
    before = conv_similarity(w, pairs=pairs, channels=channels, normalized=True)
    after = conv_similarity(w * scales, pairs=pairs, channels=channels, normalized=True)
    assert torch.allclose(before, after, rtol=1e-12)
    raw_before = conv_similarity(w, pairs=pairs, channels=channels)
    raw_after = conv_similarity(w * 0.5, pairs=pairs, channels=channels)
    assert torch.allclose(raw_after, raw_before / 16, rtol=1e-12)  # CS is quartic in the weights


@pytest.mark.parametrize("channels", ["same", "cross"])
def test_grouped_conv_counts_only_pairs_inside_a_group(channels):
    torch.manual_seed(6)
    w = torch.randn(8, 2, 3, 3, dtype=torch.float64)  # 4 groups of 2 filters
    expected = sum(conv_similarity(w[g * 2 : g * 2 + 2], channels=channels) for g in range(4))
    assert torch.allclose(conv_similarity(w, channels=channels, groups=4), expected, rtol=1e-12)
    assert torch.allclose(conv_similarity_reference(w, channels=channels, groups=4), expected, rtol=1e-12)
    depthwise = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    assert abs(conv_similarity(depthwise, groups=5).item()) <= 1e-12 * _quartic_scale(depthwise)  # no pairs


@pytest.mark.parametrize("channels", ["same", "cross"])
@pytest.mark.parametrize("normalized", [False, True])
def test_pairwise_matrix_agrees_with_scalar(channels, normalized):
    torch.manual_seed(7)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    mat = pairwise_similarity(w, channels=channels, normalized=normalized)
    assert mat.shape == (5, 5)
    assert torch.allclose(mat, mat.T)
    scalar = conv_similarity(w, channels=channels, normalized=normalized)
    assert torch.allclose(torch.triu(mat, 1).sum(), scalar, rtol=1e-12)
    # one entry straight from the definition
    ww = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1) if normalized else w
    chans = [(a, a) for a in range(3)] if channels == "same" else list(itertools.product(range(3), range(3)))
    entry = sum(_xcorr_loops(ww[1, a], ww[3, b]).square().sum() for a, b in chans)
    assert torch.allclose(mat[1, 3], entry, rtol=1e-12)


def test_pairwise_grouped_is_block_diagonal():
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    mat = pairwise_similarity(w, groups=3)
    assert mat[0, 2].item() == 0.0 and mat[4, 1].item() == 0.0  # exact: placed zeros, nothing computed
    assert torch.allclose(mat[2:4, 2:4], pairwise_similarity(w[2:4]))


def test_model_conv_similarity_sums_layers_and_honours_weights():
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 6, 1), nn.Conv1d(6, 4, 3)
    ).double()
    per_layer = layer_similarities(model)
    assert set(per_layer) == {"0", "2", "3", "4"}
    depthwise = model[2].weight.detach()
    assert abs(per_layer["2"].item()) <= 1e-12 * _quartic_scale(depthwise)  # depthwise: no pairs
    total = model_conv_similarity(model)
    assert torch.allclose(total, sum(per_layer.values()))
    weighted = model_conv_similarity(model, layer_weight={"0": 0.0, "3": 2.0})
    assert torch.allclose(weighted, 2 * per_layer["3"] + per_layer["4"])
    only_1x1 = model_conv_similarity(model, layer_weight=lambda name, m: float(m.kernel_size == (1, 1)))
    assert torch.allclose(only_1x1, per_layer["3"])
    total.backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_model_without_convs_gives_zero():
    assert model_conv_similarity(nn.Linear(3, 2)).item() == 0.0  # exact: a constant, nothing computed


@pytest.mark.parametrize(
    "kwargs,accepted",
    [({"pairs": "some"}, "'all', 'adjacent'"), ({"channels": "both"}, "'same', 'cross'")],
)
def test_bad_option_names_the_accepted_values(kwargs, accepted):
    with pytest.raises(ValueError, match=accepted):
        conv_similarity(torch.randn(2, 2, 3, 3), **kwargs)


@pytest.mark.parametrize("bad", [torch.ones(4, 4), torch.ones(2, 2, 2, 2, 2, 2), torch.ones(2, 2, 3, 3, dtype=torch.long)])
def test_non_conv_weight_is_refused(bad):
    with pytest.raises(ValueError, match="conv weight"):
        conv_similarity(bad)


def test_groups_must_divide_outputs():
    with pytest.raises(ValueError, match="groups=3"):
        conv_similarity(torch.randn(4, 1, 3, 3), groups=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w = torch.randn(32, 16, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(conv_similarity(w.cuda()).cpu(), conv_similarity(w), rtol=1e-10)
