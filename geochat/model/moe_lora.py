"""Mixture-of-LoRA-experts layers: several low-rank adapters behind a learned top-k router.

A frozen linear layer W gets E LoRA experts (A_e: in→r, B_e: r→out) and a router R: in→E. For each
token x the router picks the k experts with the highest logits, renormalises their softmax weights
g_e over those k, and adds their low-rank updates:

    y = W x + (alpha / r) · Σ_{e ∈ topk(R x)} g_e(x) · B_e A_e x

Routing per token lets different experts specialise (e.g. captions vs. boxes). To keep the router
from collapsing onto one expert, each layer records the Switch-Transformer load-balancing loss

    L_aux = E · Σ_e f_e · P_e

with f_e the fraction of (token, slot) assignments that went to expert e and P_e the mean router
probability of e; it equals 1 for a perfectly uniform router and grows as routing concentrates.
`collect_aux_loss(model)` sums it over layers after a forward pass; the trainer adds it, weighted.

peft has no mixture-of-LoRA tuner, so this wraps `nn.Linear` modules itself; B starts at zero, so
a freshly wrapped model computes exactly what the base model computed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MoELoraSettings:
    num_experts: int = 4
    top_k: int = 2
    r: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    aux_loss_weight: float = 0.01

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if self.r < 1:
            raise ValueError("r must be >= 1")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")


class MoELoraLinear(nn.Module):
    """A frozen `nn.Linear` plus a top-k routed mixture of LoRA experts."""

    def __init__(self, base: nn.Linear, settings: MoELoraSettings) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.top_k = settings.top_k
        self.scaling = settings.alpha / settings.r
        e, r = settings.num_experts, settings.r
        self.router = nn.Linear(base.in_features, e, bias=False)
        self.expert_A = nn.Parameter(torch.empty(e, base.in_features, r))
        self.expert_B = nn.Parameter(torch.zeros(e, r, base.out_features))
        nn.init.kaiming_uniform_(self.expert_A, a=math.sqrt(5))
        nn.init.normal_(self.router.weight, std=0.02)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        flat = x.reshape(-1, x.shape[-1])  # (T, in)
        dtype = self.expert_A.dtype
        probs = F.softmax(self.router(flat.to(self.router.weight.dtype)).float(), dim=-1)  # (T, E)
        top_p, top_e = probs.topk(self.top_k, dim=-1)  # (T, k)
        gates = (top_p / top_p.sum(-1, keepdim=True)).to(dtype)
        # Every expert's low-rank code, zeroed by the gate where the router did not pick it, then one matmul
        # for all experts: (T, E·r) @ (E·r, out). Equal to gathering each token's k experts, without the
        # (T, k, r, out) copy of B that gathering makes (3.6x slower: benchmarks/train_step_time.py).
        num_experts, rank = self.expert_A.shape[0], self.expert_A.shape[2]
        dense_gates = torch.zeros_like(probs, dtype=dtype).scatter(1, top_e, gates)  # (T, E)
        low = torch.einsum("ti,eir->ter", flat.to(dtype), self.expert_A) * dense_gates.unsqueeze(-1)
        delta = low.reshape(-1, num_experts * rank) @ self.expert_B.reshape(num_experts * rank, -1) * self.scaling
        if self.training:
            assigned = F.one_hot(top_e, num_experts).float().sum(1).mean(0) / self.top_k  # f_e
            self.aux_loss = num_experts * (assigned * probs.mean(0)).sum()
        return out + delta.reshape(*out.shape[:-1], -1).to(out.dtype)


def apply_moe_lora(model: nn.Module, settings: MoELoraSettings, scope: str = r"language_model") -> list[str]:
    """Wrap every `nn.Linear` under `scope` whose name ends with a target module; returns wrapped names."""
    pattern = re.compile(rf"(^|\.){scope}\..*\.({'|'.join(map(re.escape, settings.target_modules))})$")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    if not names:
        raise ValueError(f"no linear layer matches MoE-LoRA targets {settings.target_modules} under '{scope}'")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, MoELoraLinear(getattr(parent, child), settings))
    return names


def moe_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trainable MoE-LoRA tensors (routers and experts), for saving."""
    return {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if ".router." in k or k.endswith((".expert_A", ".expert_B"))
        if _is_moe_key(model, k)
    }


def _is_moe_key(model: nn.Module, key: str) -> bool:
    module_name = key.rsplit(".", 2)[0] if ".router." in key else key.rsplit(".", 1)[0]
    return isinstance(model.get_submodule(module_name), MoELoraLinear)


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean load-balancing loss over MoE-LoRA layers from the last training forward pass."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoELoraLinear) and m.aux_loss is not None]
    return torch.stack(losses).mean() if losses else None
