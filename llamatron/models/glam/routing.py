"""Token-choice top-k routing: Pax/GShard's top-2 gating with expert capacity, or dropless.

Pax (praxis `gshard_utils.top2_gating_on_logits`, `legacy_mtf_behavior=True`, its default), per group
of S tokens (here: one sequence, so routing does not depend on the batch size or the layout):
  - router logits in fp32, softmax over the E experts: probabilities P [S, E];
  - top-1 = argmax P; top-2 = argmax of P with the top-1 entry zeroed (ties: the lowest index);
  - the two gates renormalised to sum to 1 (gate_i / (gate_1 + gate_2 + 1e-9)) BEFORE any drop, so a
    token that loses its second expert keeps gate_1 < 1 (legacy MTF behaviour);
  - capacity C = int(S x capacity_factor / E); if that exceeds 1 it is rounded up to a multiple of 4,
    else C = 1 (Pax starts from expert_capacity_dim = 1);
  - top-1 assignments fill each expert's C slots first, in token order; top-2 assignments take the
    slots left, in token order; the rest are dropped (the token's MoE output is then only the other
    expert's, or zero: the residual carries it);
  - aux loss = E^2 x mean_e(f_e x p_e), f_e = fraction of tokens whose top-1 is e (before drops),
    p_e = mean router probability of e; averaged over groups.
capacity_factor = 0 is dropless token choice (torchtitan / Megatron default): every assignment kept.
Optional z-loss (ST-MoE, Megatron `--moe-z-loss-coeff`): mean(logsumexp(logits)^2), returned apart.

Padding (`valid`, scoring and generation only: training sequences are never padded) is masked as
Pax masks its `paddings`: a padding token has no assignment, takes no slot and counts in no load; and,
beyond Pax, each group's capacity is that of its own real token count, so a padded row routes exactly
as the same tokens alone and unpadded (Pax takes the capacity from the padded group size).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Every token's top-k choices of one MoE layer (G groups of S tokens), their gates and buffer slots.

    The per-choice tensors have static shapes (no host sync, one graph under torch.compile): the
    capacity path dispatches with them directly. `token`, `expert` and `gate` list the kept
    assignments sorted by expert (data-dependent sizes): the dropless path and the tests read those."""

    choice: torch.Tensor  # [G, S, k] int64 expert of each choice
    choice_gate: torch.Tensor  # [G, S, k] fp32 renormalised gate (differentiable w.r.t. the router logits)
    slot: torch.Tensor  # [G, S, k] int64 position in its expert's buffer for the group (top-1s first)
    kept: torch.Tensor  # [G, S, k] bool: slot < capacity (all True when dropless)
    capacity: int  # slots per expert per group in the buffer (0 = dropless); padded groups keep fewer
    counts: torch.Tensor  # [E] int64 kept assignments per expert
    aux_loss: torch.Tensor  # fp32 scalar, unweighted (Pax's value; the layer applies the coefficient)
    z_loss: torch.Tensor  # fp32 scalar, unweighted
    dropped: torch.Tensor  # int64 scalar: assignments dropped for capacity
    assigned: int | torch.Tensor  # assignments before drops (real tokens x top_k)

    @functools.cached_property
    def _sorted(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        G, S, k = self.choice.shape
        keep = self.kept.reshape(-1)
        expert = self.choice.reshape(-1)[keep]
        # A stable sort keeps token order within each expert: the order the loop reference uses too.
        order = torch.sort(expert, stable=True).indices
        token = torch.arange(G * S, device=keep.device).view(G, S, 1).expand(G, S, k).reshape(-1)[keep]
        return token[order], expert[order], self.choice_gate.reshape(-1)[keep][order]

    @property
    def token(self) -> torch.Tensor:
        """[A] index (over the G x S tokens) of each kept assignment, sorted by expert."""
        return self._sorted[0]

    @property
    def expert(self) -> torch.Tensor:
        """[A] expert of each kept assignment (non-decreasing)."""
        return self._sorted[1]

    @property
    def gate(self) -> torch.Tensor:
        """[A] fp32 combine weight of each kept assignment."""
        return self._sorted[2]


def expert_capacity(group_size: int, n_experts: int, capacity_factor: float) -> int:
    """Pax's capacity per expert per group (0 = dropless: no limit)."""
    if capacity_factor <= 0:
        return 0
    auto = int(group_size * capacity_factor / n_experts)
    if auto <= 1:
        return 1
    return (auto + 3) // 4 * 4


def row_capacity(n_tokens: torch.Tensor, n_experts: int, capacity_factor: float) -> torch.Tensor:
    """`expert_capacity` of each group's real token count, on the device (no host sync): the same
    float64 arithmetic as Python's int(n x factor / E), so it equals `expert_capacity` exactly."""
    auto = torch.floor(n_tokens.double() * capacity_factor / n_experts).long()
    return torch.where(auto <= 1, 1, (auto + 3) // 4 * 4)


def top_k_indices(probs: torch.Tensor, k: int) -> torch.Tensor:
    """[.., E] -> [.., k] expert indices: top-1 the argmax, each next the argmax of the rest (Pax's
    greedy second expert; argmax breaks ties by the lowest index, as jnp.argmax)."""
    rest = probs
    picks = []
    for _ in range(k):
        idx = rest.argmax(dim=-1)
        picks.append(idx)
        rest = rest.scatter(-1, idx.unsqueeze(-1), -1.0)
    return torch.stack(picks, dim=-1)


def _one_hot(idx: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    # A comparison, not F.one_hot: that one checks the indices' range on the host (a sync on CUDA).
    return (idx.unsqueeze(-1) == torch.arange(n, device=idx.device)).to(dtype)


def _choices(logits: torch.Tensor, top_k: int):
    """fp32 logits, probabilities, each token's top-k experts [G, S, k] and their renormalised gates."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    idx = top_k_indices(probs.detach(), top_k)  # [G, S, k]
    gates = probs.gather(-1, idx)  # [G, S, k]
    return logits, probs, idx, gates / (gates.sum(-1, keepdim=True) + 1e-9)


def _slots(onehot: torch.Tensor) -> torch.Tensor:
    """onehot [G, k, S, E] -> each choice's slot in its expert's buffer [G, S, k]: choice 0 of every
    token first, in token order, then choice 1, ... (an exclusive cumulative count over [k, S] for
    each group and expert)."""
    G, k, S, E = onehot.shape
    flat = onehot.reshape(G, k * S, E)
    slot = ((flat.cumsum(1, dtype=torch.int32) - flat) * flat).sum(-1, dtype=torch.int64)
    return slot.view(G, k, S).transpose(1, 2)


def route(logits: torch.Tensor, top_k: int, capacity_factor: float, valid: torch.Tensor | None = None) -> Routing:
    """logits [G, S, E] (G groups of S tokens) -> every choice's expert, gate and slot, and the losses.
    valid [G, S] bool (None: all real): False marks padding (module doc)."""
    if valid is not None:
        return _route_padded(logits, top_k, capacity_factor, valid)
    G, S, E = logits.shape
    logits, probs, idx, gates = _choices(logits, top_k)
    # Aux loss from the top-1 choices before capacity (Pax's density_1 / density_1_proxy).
    top1 = _one_hot(idx[..., 0], E, torch.float32)  # [G, S, E]
    aux = (top1.mean(1) * probs.mean(1)).mean() * E * E
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()

    onehot = _one_hot(idx.transpose(1, 2), E, torch.int32)  # [G, k, S, E]
    slot = _slots(onehot)
    capacity = expert_capacity(S, E, capacity_factor)
    kept = slot < capacity if capacity else torch.ones_like(slot, dtype=torch.bool)
    # Kept per expert: each expert's demand per group, capped at the capacity.
    demand = onehot.sum((1, 2))  # [G, E]
    counts = (demand.clamp(max=capacity) if capacity else demand).sum(0, dtype=torch.int64)
    return Routing(choice=idx, choice_gate=gates, slot=slot, kept=kept, capacity=capacity, counts=counts,
                   aux_loss=aux, z_loss=z, dropped=(~kept).sum(), assigned=G * S * top_k)


def _route_padded(logits: torch.Tensor, top_k: int, capacity_factor: float, valid: torch.Tensor) -> Routing:
    """`route` with padding taken out of every step. The buffer keeps the padded length's capacity
    (static shapes; no row's own capacity exceeds it); each row keeps the slots below its own."""
    G, S, E = logits.shape
    logits, probs, idx, gates = _choices(logits, top_k)
    real = valid.to(torch.float32).unsqueeze(-1)  # [G, S, 1]
    # Pax's masked densities: means over the padded length, padding contributing nothing.
    aux = ((_one_hot(idx[..., 0], E, torch.float32) * real).mean(1) * (probs * real).mean(1)).mean() * E * E
    n_real = valid.sum(1)  # [G]
    z = (torch.logsumexp(logits, dim=-1).pow(2) * real[..., 0]).sum() / n_real.sum().clamp(min=1)

    onehot = _one_hot(idx.transpose(1, 2), E, torch.int32) * valid[:, None, :, None].to(torch.int32)
    slot = _slots(onehot)
    capacity = expert_capacity(S, E, capacity_factor)
    demand = onehot.sum((1, 2))  # [G, E]
    kept = valid.unsqueeze(-1).expand_as(slot)
    if capacity:
        cap = row_capacity(n_real, E, capacity_factor)  # [G]
        kept = kept & (slot < cap.view(G, 1, 1))
        demand = torch.minimum(demand, cap.view(G, 1))
    return Routing(choice=idx, choice_gate=gates, slot=slot, kept=kept, capacity=capacity,
                   counts=demand.sum(0, dtype=torch.int64), aux_loss=aux, z_loss=z,
                   dropped=(valid.unsqueeze(-1) & ~kept).sum(), assigned=n_real.sum() * top_k)


def dispatch_indices(r: Routing, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The capacity buffer's layout: E x G x C rows (expert, then group, then slot), static in size.

    Returns slot_token [E G C] (the token in each row; G S = none, an empty slot), dest [G S, k] (the
    row of each choice; E G C = none, a dropped choice) and slot_choice [E G C] (the choice, token x k
    + j, in each row; G S k = none)."""
    G, S, k = r.choice.shape
    C, N = r.capacity, G * S
    rows = n_experts * G * C
    group = torch.arange(G, device=r.choice.device).view(G, 1, 1)
    dest = torch.where(r.kept, (r.choice * G + group) * C + r.slot, rows)
    # Dropped choices each scatter to a spare row past the end: no two writes to one row, so the
    # scatter is deterministic.
    ids = torch.arange(N * k, device=r.choice.device)
    target = torch.where(r.kept.reshape(-1), dest.reshape(-1), rows + ids)
    slot_choice = torch.full((rows + N * k,), N * k, device=ids.device).scatter(0, target, ids)[:rows]
    return slot_choice // k, dest.reshape(N, k).contiguous(), slot_choice


class _GatherRows(torch.autograd.Function):
    """out[i] = src[index[i]] (index len(src): a zero row), whose backward is a gather too:
    grad_src[j] = sum over m of grad_out[inverse[j, m]] (inverse len(out): nothing). The index
    backward torch would use instead is a scatter-add (a sort or atomics on CUDA)."""

    @staticmethod
    def forward(ctx, src, index, inverse):
        ctx.save_for_backward(inverse)
        return torch.cat([src, src.new_zeros(1, src.shape[1])])[index]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return torch.cat([grad, grad.new_zeros(1, grad.shape[1])])[inverse].sum(1), None, None


def gather_rows(src: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """src [n, d] rows picked by index [m] (n: zero), with inverse [n, j] listing every i with
    index[i] == row (m: none) for the backward."""
    return _GatherRows.apply(src, index, inverse)
