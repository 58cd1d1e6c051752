"""LARS and the per-iteration learning-rate schedule, as the published ACL code runs them
(docs/acl-air.md section 5), and AdamW for the ViTs (docs/backbones.md)."""

from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """LARS with the learning rate inside the momentum buffer, applied to every parameter tensor.

    For a parameter w with gradient g (BN and biases included, as published):
        local = eta ||w|| / (||g|| + wd ||w||), or 1 when ||w|| or ||g|| < 1e-15
        buf   = momentum * buf + lr * local * (g + wd w)
        w     = w - buf
    Defaults are the published ones (docs/acl-air.md section 5): eta 0.001, momentum 0.9, wd 1e-6.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 eta: float = 0.001):
        if not lr >= 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if not eta > 0:
            raise ValueError(f"LARS: eta must be > 0, got {eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, eta = group["weight_decay"], group["eta"]
            # One fused norm per list instead of a Python loop of .norm() calls.
            w_norms = torch.stack(torch._foreach_norm(params))
            g_norms = torch.stack(torch._foreach_norm(grads))
            trust = eta * w_norms / (g_norms + wd * w_norms)
            tiny = (w_norms < 1e-15) | (g_norms < 1e-15)
            local = torch.where(tiny, torch.ones_like(trust), trust) * group["lr"]
            updates = torch._foreach_add(grads, params, alpha=wd)  # g + wd w
            torch._foreach_mul_(updates, list(local.unbind()))
            buffers = []
            for p, update in zip(params, updates, strict=True):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                buffers.append(state["momentum_buffer"])
            torch._foreach_sub_(params, buffers)
        return loss


def build_optimizer(named_parameters, name: str, lr: float, weight_decay: float,
                    momentum: float = 0.9, eta: float = 0.001) -> torch.optim.Optimizer:
    """The run's optimiser over (name, parameter) pairs: "lars" or "adamw".

    LARS treats every tensor alike, as published. AdamW decays only the weight matrices: biases,
    norm parameters, a ViT's class token and position embedding are left undecayed (DeiT's and
    MoCo v3's practice). LARS on a ViT collapses its features: the zero-initialised biases (the
    patch embedding's, the attention projections') take LARS's plain-SGD step for zero-norm
    tensors, grow past the weights and make every token alike (docs/backbones.md, ViTs).
    """
    named = list(named_parameters)
    if name == "lars":
        return LARS([p for _, p in named], lr=lr, momentum=momentum, weight_decay=weight_decay,
                    eta=eta)
    if name != "adamw":
        raise ValueError(f"optimizer must be 'lars' or 'adamw', got {name!r}")
    def decayed(name: str, p: torch.Tensor) -> bool:  # a weight matrix, not a token
        return p.ndim >= 2 and not name.endswith(("cls_token", "pos_embed"))

    return torch.optim.AdamW(
        [{"params": [p for n, p in named if decayed(n, p)], "weight_decay": weight_decay},
         {"params": [p for n, p in named if not decayed(n, p)], "weight_decay": 0.0}], lr=lr)


def warmup_cosine_lr(iteration: int, total_iterations: int, warmup_iterations: int,
                     base_lr: float, min_lr: float = 1e-6) -> float:
    """The learning rate of 0-based iteration `iteration` (docs/acl-air.md section 5).

    Linear warm-up base_lr * t / T_w for the 1-based step t = iteration + 1 <= T_w (so the first
    step is not wasted at lr 0), then cosine from base_lr to min_lr at the last iteration.
    """
    t = iteration + 1
    if t <= warmup_iterations:
        return base_lr * t / warmup_iterations
    span = max(total_iterations - warmup_iterations, 1)
    progress = min((t - warmup_iterations) / span, 1.0)
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2
