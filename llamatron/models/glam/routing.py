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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """The kept assignments of one MoE layer's tokens (N tokens flattened over batch x sequence)."""

    token: torch.Tensor  # [A] int64 index of the token of each kept assignment, sorted by expert
    expert: torch.Tensor  # [A] int64 expert of each kept assignment (non-decreasing)
    gate: torch.Tensor  # [A] fp32 combine weight (differentiable w.r.t. the router logits)
    counts: torch.Tensor  # [E] int64 kept assignments per expert
    aux_loss: torch.Tensor  # fp32 scalar, unweighted (Pax's value; the layer applies the coefficient)
    z_loss: torch.Tensor  # fp32 scalar, unweighted
    dropped: torch.Tensor  # int64 scalar: assignments dropped for capacity
    assigned: int  # assignments before drops (N x top_k)


def expert_capacity(group_size: int, n_experts: int, capacity_factor: float) -> int:
    """Pax's capacity per expert per group (0 = dropless: no limit)."""
    if capacity_factor <= 0:
        return 0
    auto = int(group_size * capacity_factor / n_experts)
    if auto <= 1:
        return 1
    return (auto + 3) // 4 * 4


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


def route(logits: torch.Tensor, top_k: int, capacity_factor: float) -> Routing:
    """logits [G, S, E] (G groups of S tokens) -> the kept assignments, gates and losses."""
    G, S, E = logits.shape
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    idx = top_k_indices(probs.detach(), top_k)  # [G, S, k]
    gates = probs.gather(-1, idx)  # [G, S, k]
    gates = gates / (gates.sum(-1, keepdim=True) + 1e-9)

    # Aux loss from the top-1 choices before capacity (Pax's density_1 / density_1_proxy).
    top1 = torch.nn.functional.one_hot(idx[..., 0], E).float()  # [G, S, E]
    aux = (top1.mean(1) * probs.mean(1)).mean() * E * E
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()

    # Slot of each assignment in its expert's buffer: choice 0 of every token first, in token order,
    # then choice 1, ... (an exclusive cumulative count over [k, S] for each group and expert).
    onehot = torch.nn.functional.one_hot(idx.transpose(1, 2), E)  # [G, k, S, E]
    flat = onehot.reshape(G, top_k * S, E)
    position = (flat.cumsum(1) - flat).mul(flat).sum(-1).reshape(G, top_k, S).transpose(1, 2)  # [G, S, k]
    capacity = expert_capacity(S, E, capacity_factor)
    keep = position < capacity if capacity else torch.ones_like(position, dtype=torch.bool)

    token = torch.arange(G * S, device=logits.device).view(G, S, 1).expand(G, S, top_k)
    keep_f = keep.reshape(-1)
    expert = idx.reshape(-1)[keep_f]
    # A stable sort keeps token order within each expert: the order the loop reference uses too.
    order = torch.sort(expert, stable=True).indices
    counts = torch.bincount(expert, minlength=E)
    return Routing(token=token.reshape(-1)[keep_f][order], expert=expert[order], gate=gates.reshape(-1)[keep_f][order],
                   counts=counts, aux_loss=aux, z_loss=z, dropped=(~keep_f).sum(), assigned=G * S * top_k)
