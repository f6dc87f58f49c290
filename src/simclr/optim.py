"""LARS, parameter groups, and per-step learning-rate schedules."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """LARS as in the official SimCLR (TF ``LARSOptimizer``), written by hand because neither
    torch nor torchvision ships LARS.

    For each parameter w with gradient g (per step, in this order):
        g <- g + weight_decay * w                                  (if w gets weight decay)
        trust = trust_coefficient * ||w|| / ||g||  if both norms > 0 else 1   (if w is adapted)
        v <- momentum * v + lr * trust * g
        w <- w - v
    Note the velocity accumulates ``lr * trust * g`` (TF style), not ``g`` alone.

    Which parameters are excluded from weight decay and adaptation is set per param group
    by ``exclude``: ``"ndim"`` (default: every parameter with ndim <= 1 — all batch-norm
    weights and biases and all biases), ``True`` (every parameter of the group) or
    ``False`` (none). That is how the spec's name-based rule is offered
    (see :func:`param_groups`).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3, exclude="ndim", foreach: bool = False):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, exclude=exclude, foreach=foreach)
        super().__init__(params, defaults)

    @staticmethod
    def _excluded(p: torch.Tensor, exclude) -> bool:
        return p.ndim <= 1 if exclude == "ndim" else bool(exclude)

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
            if group["foreach"]:
                self._step_foreach(group, params)
            else:
                self._step_plain(group, params)
        return loss

    def _step_plain(self, group, params):
        lr, mom, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["trust_coefficient"]
        for p in params:
            g = p.grad
            excluded = self._excluded(p, group["exclude"])
            if not excluded and wd != 0:
                g = g.add(p, alpha=wd)
            scaled = g.mul(lr)
            if not excluded:
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                trust = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, torch.ones_like(w_norm))
                scaled.mul_(trust)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mom).add_(scaled)
            p.sub_(buf)

    def _step_foreach(self, group, params):
        """Same update with multi-tensor kernels: a handful of launches instead of ~10 per parameter."""
        lr, mom, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["trust_coefficient"]
        adapt = [p for p in params if not self._excluded(p, group["exclude"])]
        fixed = [p for p in params if self._excluded(p, group["exclude"])]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        if adapt:
            grads = [p.grad for p in adapt]
            if wd != 0:
                grads = torch._foreach_add(grads, adapt, alpha=wd)
            else:
                grads = [g.clone() for g in grads]
            w_norms = torch.stack(torch._foreach_norm(adapt))
            g_norms = torch.stack(torch._foreach_norm(grads))
            trust = torch.where((w_norms > 0) & (g_norms > 0), eta * w_norms / g_norms, torch.ones_like(w_norms))
            torch._foreach_mul_(grads, list((trust * lr).unbind()))
            bufs = [self.state[p]["momentum_buffer"] for p in adapt]
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, grads)
            torch._foreach_sub_(adapt, bufs)
        if fixed:
            bufs = [self.state[p]["momentum_buffer"] for p in fixed]
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, [p.grad for p in fixed], alpha=lr)
            torch._foreach_sub_(fixed, bufs)


def _spec_excluded(name: str) -> bool:
    # The spec's rule: exclude by name. It misses BN layers inside residual downsample
    # branches (named 'downsample.1.*'), which is why it is not our default.
    return "bn" in name or "bias" in name


# Parameters that are no weights to shrink or adapt although they have more than one dimension: position
# embeddings and class/distillation/register tokens (timm's and torchvision's names), as in DeiT, MoCo v3 and
# timm's own param_groups_weight_decay.
EMBEDDING_NAMES = ("pos_embed", "pos_embedding", "absolute_pos_embed", "cls_token", "class_token", "dist_token",
                   "reg_token")


def model_no_decay(model: nn.Module) -> set:
    """Names of the parameters a model keeps out of weight decay: what any submodule's ``no_weight_decay()`` (timm's
    convention) lists, and the parameters named like a position embedding or a token."""
    names = set()
    for prefix, mod in model.named_modules():
        fn = getattr(mod, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    names |= {n for n, _ in model.named_parameters() if n.split(".")[-1] in EMBEDDING_NAMES}
    return names


def param_groups(model: nn.Module, weight_decay: float, rule: str = "ndim") -> list[dict]:
    """Parameter groups for LARS/SGD/Adam.

    rule="ndim": 1-d parameters (every BN/LayerNorm weight and bias, every bias), position embeddings and class
    tokens (:func:`model_no_decay`) get no weight decay and no LARS adaptation. rule="spec": the spec's name-based
    rule (names containing 'bn' or 'bias').
    """
    if rule not in ("ndim", "spec"):
        raise ValueError(f"rule must be 'ndim' or 'spec', got {rule!r}")
    embeddings = model_no_decay(model) if rule == "ndim" else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = (p.ndim <= 1 or name in embeddings) if rule == "ndim" else _spec_excluded(name)
        (no_decay if excluded else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "exclude": True},
    ]


MOMENTUM = 0.9  # of LARS and SGD: the spec's and the official SimCLR's (--momentum accepts only this value)


def build_optimizer(model, name: str, lr: float, weight_decay: float = 0.0,
                    rule: str = "ndim", foreach: bool = False) -> torch.optim.Optimizer:
    """The one optimizer factory of pretraining and evaluation: LARS, SGD (both with momentum :data:`MOMENTUM`) or
    Adam. ``model``: a module, its parameters split by ``rule`` (:func:`param_groups`: no weight decay and no LARS
    adaptation for the excluded ones), or parameter groups as torch.optim takes them (a list of dicts; a group
    without its own ``weight_decay`` gets ``weight_decay``, one without its own ``lr`` gets ``lr``)."""
    if isinstance(model, nn.Module):
        groups = param_groups(model, weight_decay, rule)
    else:
        groups = [{"weight_decay": weight_decay, **g} for g in model]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=MOMENTUM, foreach=foreach)
    groups = [{k: v for k, v in g.items() if k != "exclude"} for g in groups]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; allowed: lars, sgd, adam")


def scaled_lr(lr: float, batch_size: int, mode: str = "none") -> float:
    """The official SimCLR ``learning_rate_scaling``: none (the spec's: lr as given), linear
    (lr * batch_size / 256) or sqrt (lr * sqrt(batch_size)). ``batch_size`` is the global one."""
    if mode == "none":
        return float(lr)
    if mode == "linear":
        return float(lr) * batch_size / 256.0
    if mode == "sqrt":
        return float(lr) * math.sqrt(batch_size)
    raise ValueError(f"unknown lr_scaling {mode!r}; allowed: none, linear, sqrt")


def lr_schedule(base_lr: float, iters: int, kind: str = "warmup-anneal", warmup: float = 0.0) -> np.ndarray:
    """Learning rate for every optimizer step 0..iters-1, computed up front so that resuming
    is just indexing with the global step.

    warmup-anneal: lr * s / W for s < W = round(warmup * iters) (the official SimCLR warmup),
                   then cosine from lr to 0: lr * 0.5 * (1 + cos(pi * (s - W) / (iters - W))).
    linear:        lr * (1 - s / iters)
    const:         lr
    """
    s = np.arange(iters, dtype=np.float64)
    if kind == "warmup-anneal":
        w = int(round(warmup * iters))
        out = np.empty(iters)
        out[:w] = base_lr * s[:w] / max(w, 1)
        rest = max(iters - w, 1)
        out[w:] = base_lr * 0.5 * (1 + np.cos(math.pi * (s[w:] - w) / rest))
        return out
    if kind == "linear":
        return base_lr * (1 - s / iters)
    if kind == "const":
        return np.full(iters, float(base_lr))
    raise ValueError(f"unknown lr_schedule {kind!r}; allowed: warmup-anneal, linear, const")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
