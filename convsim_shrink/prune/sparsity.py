"""Torch-Pruning's group-norm regulariser (``GroupNormPruner.regularize``), vectorised over groups.

The library's ``regularize`` walks every channel group in Python each step: per group it scores the
channels (``GroupMagnitudeImportance(p=2)``, one small tensor op per layer of the group and a host sync
for the NaN check), then edits the gradient of each layer of the group with a few indexed copies.  On a
ResNet18 that is a few hundred small ops and ~20 host syncs per step: a fifth of a bf16 training step
at 28 px (issue 26).

:class:`GroupNormRegularizer` reads the groups once, when it is built, into flat index tensors, and
then computes the same thing each step with a handful of batched ops:

1. ``stats``: per layer and per pruning dimension the sum of squared weights of each channel (one
   ``w * w`` and two reductions per layer), concatenated into one vector;
2. ``imp = index_add(stats[src])``: the group score of every channel of every group (the library's
   ``group_reduction="mean"`` divides by a constant per group and ``normalizer="mean"`` rescales a
   group, neither of which changes ``gamma`` below, so both are left out);
3. per group the max and min of ``s = sqrt(imp)`` (``scatter_reduce``) and
   ``gamma = alpha ** ((max - s) / (max - min))``; a group whose scores are all alike (within 1e-12
   of its largest) or not finite is skipped, as :class:`convsim_shrink.prune.pruning._GroupSparsity` does;
4. ``coef = index_add(gamma[src])``: per layer and dimension the summed gamma of each channel (a
   conv's filters belong to one group and its input channels to another: the two decays add up, as
   in the library, which adds them one group after the other);
5. per layer one ``grad.addcmul_(w, coef_out ⊗ coef_in, value=reg)``.

Groups the flat form does not cover exactly as the library does (grouped or depthwise convolutions,
transposed convolutions, channel groups, a layer listed twice with the same channel, root indices the
library cannot map) stay with the library's own loop, so every model gets the library's gradient.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

_F = tp.pruner.function
_OUT = (_F.prune_conv_out_channels, _F.prune_linear_out_channels)
_IN = (_F.prune_conv_in_channels, _F.prune_linear_in_channels)
_BN = _F.prune_batchnorm_out_channels
_LN = _F.prune_layernorm_out_channels
#: the layer types GroupMagnitudeImportance scores (its default target_types)
_SCORED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def _flat_case(pruner, group) -> bool:
    """Whether the vectorised form reproduces the library's regularize() on ``group`` exactly."""
    if pruner._get_channel_groups(group) != 1:
        return False
    seen = set()
    for item in group:
        dep, idxs = item.dep, list(item.idxs)
        layer = dep.target.module
        if isinstance(layer, nn.modules.conv._ConvNd) and (layer.groups != 1 or layer.transposed):
            return False
        if isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
            w = getattr(layer, "weight", None)
            if w is not None and w.dim() != 1:
                return False
        if dep.handler in (*_OUT, *_IN, _BN, _LN):
            if any(r is None for r in item.root_idxs) or len(set(idxs)) != len(idxs):
                return False
            key = (id(layer), dep.handler)
            if key in seen:  # the same layer twice in one group: the library's indexed += would not add up
                return False
            seen.add(key)
    return True


class GroupNormRegularizer:
    """``regularize()`` adds ``reg * gamma * w`` to the gradient of every weight of every channel group
    of ``pruner`` (a built ``tp.pruner.GroupNormPruner`` scoring with
    ``GroupMagnitudeImportance(p=2)``), the same gradient as ``pruner.regularize(model)`` (within float
    rounding) with a handful of batched tensor ops per step instead of a Python loop over groups.

    ``alpha``: the decay ratio between a group's weakest and strongest channel (the library's default
    ``2 ** 4``).  Layers are read by module, so parameters replaced in place (``.to(memory_format=...)``,
    a device move) are followed; after pruning build a new one.
    """

    def __init__(self, pruner: tp.pruner.GroupNormPruner, *, alpha: float = 2.0**4):
        self.reg, self.alpha = float(pruner.reg), float(alpha)
        self._pruner = pruner
        flat, rest = [], []
        for group in pruner._groups:
            (flat if _flat_case(pruner, group) else rest).append(group)
        self.fallback_groups = rest
        # slots: one per (layer, dimension) whose channels a group scores or regularises
        self._slots: dict[tuple[int, int], int] = {}
        self._slot_list: list[tuple[nn.Module, int, int, int]] = []  # (layer, dim, offset, size)
        size = 0

        def slot(layer: nn.Module, dim: int) -> int:
            nonlocal size
            key = (id(layer), dim)
            if key not in self._slots:
                n = layer.weight.shape[dim]
                self._slots[key] = size
                self._slot_list.append((layer, dim, size, n))
                size += n
            return self._slots[key]

        imp_src, imp_dst, grad_src, grad_dst, group_of = [], [], [], [], []
        channels = 0
        n_groups = 0
        for group in flat:
            n = None
            scored = []
            for item in group:
                dep, idxs, roots = item.dep, list(item.idxs), list(item.root_idxs)
                layer, fn = dep.target.module, dep.handler
                if fn in _OUT:
                    dim = 0
                elif fn in _IN:
                    dim = 1
                elif fn in (_BN, _LN):
                    if getattr(layer, "weight", None) is None:  # not affine: nothing to score or decay
                        continue
                    dim = 0
                else:
                    continue
                base = slot(layer, dim)
                src = [base + i for i in idxs]
                dst = [channels + r for r in roots]
                if isinstance(layer, _SCORED):
                    scored.append((src, dst))
                if fn != _LN:
                    grad_src.extend(dst)
                    grad_dst.extend(src)
            if not scored:
                continue
            for src, dst in scored:
                imp_src.extend(src)
                imp_dst.extend(dst)
            n = 1 + max(max(d) for _, d in scored) - channels
            group_of.extend([n_groups] * n)
            channels += n
            n_groups += 1
        self.n_groups, self.n_channels, self.n_slots = n_groups, channels, size

        def as_long(v):
            return torch.tensor(v, dtype=torch.long)

        self._index = {
            "imp_src": as_long(imp_src), "imp_dst": as_long(imp_dst), "grad_src": as_long(grad_src),
            "grad_dst": as_long(grad_dst), "group": as_long(group_of),
        }
        # per layer: (dim, offset, size, shape that broadcasts a slot's coefficients over the weight)
        self._layers: dict[int, tuple[nn.Module, list[tuple[int, int, int, list[int]]]]] = {}
        for layer, dim, offset, n in self._slot_list:
            shape = [1] * layer.weight.dim()
            shape[dim] = n
            self._layers.setdefault(id(layer), (layer, []))[1].append((dim, offset, n, shape))

    def _indices(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._index["group"].device != device:
            self._index = {k: v.to(device) for k, v in self._index.items()}
        return self._index

    @torch.no_grad()
    def gammas(self) -> torch.Tensor:
        """The coefficient of every slot channel, ``(n_slots,)``: the summed ``gamma`` of the groups the
        channel belongs to, 0 where none (or its group is skipped)."""
        some = next(iter(self._layers.values()))[0].weight
        ix = self._indices(some.device)
        parts = {}
        for layer, dims in self._layers.values():
            w = layer.weight.detach()
            w2 = (w * w).float()
            for dim, offset, _, _ in dims:
                other = [d for d in range(w.dim()) if d != dim]
                parts[offset] = w2.sum(other) if other else w2
        stats = torch.cat([parts[offset] for offset in sorted(parts)])  # in slot order
        imp = torch.zeros(self.n_channels, device=stats.device).index_add_(0, ix["imp_dst"], stats[ix["imp_src"]])
        group = ix["group"]
        hi = torch.zeros(self.n_groups, device=imp.device).scatter_reduce_(0, group, imp, "amax", include_self=False)
        lo = torch.zeros(self.n_groups, device=imp.device).scatter_reduce_(0, group, imp, "amin", include_self=False)
        bad = torch.zeros(self.n_groups, device=imp.device).index_add_(0, group, (~torch.isfinite(imp)).float())
        keep = (hi - lo > 1e-12 * hi) & (bad == 0)  # all alike, zero or non-finite: skipped
        s, top, bottom = imp.sqrt(), hi.sqrt()[group], lo.sqrt()[group]
        gamma = torch.pow(self.alpha, (top - s) / (top - bottom))
        gamma = torch.where(keep[group], gamma, torch.zeros_like(gamma))
        return torch.zeros(self.n_slots, device=imp.device).index_add_(0, ix["grad_dst"], gamma[ix["grad_src"]])

    @torch.no_grad()
    def regularize(self, model: nn.Module | None = None) -> None:
        """Add the regulariser's gradient to every regularised weight's ``.grad`` (weights without a
        gradient are left alone).  ``model`` is not read (the layers were bound when this was built); it
        is accepted for the library's calling convention."""
        if self.n_groups:
            coef = self.gammas()
            for layer, dims in self._layers.values():
                w, g = layer.weight, layer.weight.grad
                if g is None:
                    continue
                factor = None
                for _, offset, n, shape in dims:
                    c = coef[offset : offset + n].view(shape)
                    factor = c if factor is None else factor + c
                g.addcmul_(w.detach(), factor if factor.dtype == w.dtype else factor.to(w.dtype), value=self.reg)
        if self.fallback_groups:
            groups, self._pruner._groups = self._pruner._groups, self.fallback_groups
            try:
                self._pruner.regularize(model if model is not None else self._pruner.model)
            finally:
                self._pruner._groups = groups
