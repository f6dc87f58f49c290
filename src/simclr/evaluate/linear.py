"""Linear evaluation as in the spec: a zero-initialised linear layer trained with SGD (momentum 0.9)
and the spec's linear LR decay, on frozen features (precomputed once, or several augmented
copies) or on images augmented on the fly; optionally fine-tuning the encoder too.

Also the linear head's checkpoint: ours (``kind: linear``, ``state_dict: {weight, bias}``) and
the spec's (``state_dict`` or top-level ``weight``/``bias`` plus an ``argparse.Namespace``
``hparams``) both load.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint as ckpt_lib
from ..errors import CheckpointError
from ..optim import build_optimizer, lr_schedule
from ..runtime import small_work_threads


def make_head(dim: int, n_classes: int, device="cpu") -> nn.Linear:
    """The spec's classifier: nn.Linear with weight and bias initialised to zero."""
    head = nn.Linear(dim, n_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def _optimizer(cfg, head: nn.Module, encoder: Optional[nn.Module] = None) -> torch.optim.Optimizer:
    """``cfg.opt`` (SGD with momentum 0.9, or Adam) over the head and, when fine-tuning, the encoder at its own LR,
    weight decay on every parameter (the spec's). Each group keeps ``base_lr``; the schedule scales it per step."""
    groups = [{"params": list(head.parameters()), "base_lr": cfg.lr}]
    if encoder is not None:
        enc_lr = cfg.lr if cfg.encoder_lr < 0 else cfg.encoder_lr
        groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "base_lr": enc_lr})
    for g in groups:
        g["lr"] = g["base_lr"]
    return build_optimizer(groups, cfg.opt, cfg.lr, cfg.weight_decay)


def _schedule(cfg):
    return lr_schedule(1.0, cfg.iters, cfg.lr_schedule, cfg.warmup)


def _set_factor(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


def _pbar(total: int, desc: str, enabled: bool, initial: int = 0):
    from ..progress import Progress
    return Progress(total, desc, enabled, initial=initial)


@dataclass
class Fit:
    """What the SGD loop trains and a checkpoint of it holds: the head, its optimizer, the loss scaler, the encoder
    when fine-tuning, and ``step``, the optimizer steps done. Which rows (or images) a step draws and how they are
    augmented are functions of (seed, step), so nothing else is needed to go on from a step."""
    head: nn.Linear
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler] = None
    encoder: Optional[nn.Module] = None  # fine-tuned with the head
    step: int = 0


Hook = Optional[Callable[[Fit], None]]


def _order(n: int, bs: int, seed: int, start: int) -> tuple[torch.Generator, torch.Tensor, int]:
    """The row order of the precomputed-features path at step ``start``: one permutation of the n rows per
    ``n // bs`` steps, all drawn in turn from one generator seeded with ``seed`` -> (generator, permutation,
    position in it). Step 0 is the first permutation at 0; a resumed loop redraws the earlier ones."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    epochs, b = divmod(start, n // bs)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
    return g, perm, b * bs


def train_on_features(feats: torch.Tensor, y: torch.Tensor, n_classes: int, cfg, seed: int = 0,
                      progress: bool = False, on_step: Hook = None, start: Hook = None) -> nn.Linear:
    """Train a zero-initialised linear head on precomputed features.

    feats: (N, d) or (K, N, d) — K augmented copies, each treated as N more samples.
    Every step draws ``batch_size`` rows of an epoch-wise random permutation of all K*N rows.
    ``start(fit)`` may restore a saved :class:`Fit` (resume) before the first step; ``on_step(fit)`` is called
    after every step (it may save a checkpoint, or end the loop by raising).
    """
    if feats.dim() == 3:
        k = feats.shape[0]
        feats, y = feats.reshape(-1, feats.shape[-1]), y.repeat(k)
    device = feats.device
    head = make_head(feats.shape[1], n_classes, device)
    fit = Fit(head, _optimizer(cfg, head))
    if start is not None:
        start(fit)
    factors = _schedule(cfg)
    n = feats.shape[0]
    bs = min(cfg.batch_size, n)
    g, perm, pos = _order(n, bs, seed, fit.step)
    # a small step is all threading overhead on a CPU: one thread
    with _pbar(cfg.iters, "linear head", progress, fit.step) as bar, \
            small_work_threads(device, bs * feats.shape[1] * n_classes):
        for step in range(fit.step, cfg.iters):
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos:pos + bs].to(device)
            pos += bs
            _set_factor(fit.optimizer, float(factors[step]))
            loss = F.cross_entropy(head(feats[idx]), y[idx])
            fit.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            fit.optimizer.step()
            fit.step = step + 1
            bar.update(1)
            if progress and (step + 1) % max(1, cfg.iters // 10) == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if on_step is not None:
                on_step(fit)
    return head


def train_on_images(encoder, encode: Callable, images, transform, n_classes: int, feat_dim: int, cfg,
                    device: torch.device, autocast_dtype=None, finetune: bool = False, seed: int = 0,
                    progress: bool = False, on_step: Hook = None, start: Hook = None) -> nn.Linear:
    """Train the head on images augmented on the fly (the spec's default path).

    Frozen (``finetune=False``): the encoder stays in eval mode (BN statistics untouched) and
    runs under no_grad. Fine-tuning: the encoder is in train mode and its parameters get their
    own learning rate (``encoder_lr``). Step s draws its images and their augmentations as pretraining does
    (:mod:`simclr.data.sampler`: functions of (seed, s), whatever the number of workers), so a loop that
    ``start`` restores at step s goes on exactly as the uninterrupted one; ``on_step`` as for
    :func:`train_on_features`.
    """
    from ..data.loaders import ReferenceLoader
    head = make_head(feat_dim, n_classes, device)
    # fp16 gradients of a fine-tuned encoder underflow without loss scaling (bf16/fp32: scaler off)
    fit = Fit(head, _optimizer(cfg, head, encoder if finetune else None),
              torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16),
              encoder if finetune else None)
    if start is not None:
        start(fit)
    factors = _schedule(cfg)
    loader = ReferenceLoader(images, transform, 1, min(cfg.batch_size, len(images)), seed, cfg.workers, device)
    opt, scaler = fit.optimizer, fit.scaler
    encoder.train(finetune)
    try:
        with _pbar(cfg.iters, "fine-tune" if finetune else "linear head", progress, fit.step) as bar:
            for x, y in loader.batches(fit.step, cfg.iters):
                _set_factor(opt, float(factors[fit.step]))
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    if finetune:
                        h = encode(x)
                    else:
                        with torch.no_grad():
                            h = encode(x)
                    loss = F.cross_entropy(head(h.float()), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                fit.step += 1
                bar.update(1)
                if on_step is not None:
                    on_step(fit)
    finally:
        encoder.eval()
    return head


@torch.no_grad()
def predict(head: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """Class scores: logits for (N, d); for (K, N, d) the softmax averaged over the K copies."""
    if feats.dim() == 3:
        return torch.stack([F.softmax(head(f), dim=1) for f in feats]).mean(0)
    return head(feats)


# --------------------------------------------------------------------------------------------
# the head's checkpoint
# --------------------------------------------------------------------------------------------
def save_head(path: Path, head: nn.Linear, info: dict, encoder_state: Optional[dict] = None) -> str:
    """Our format, kind ``linear``: ``state_dict`` {weight, bias} as the spec stores it, plus the
    config, encoder hash, layer, classes and the accuracy it reached (``metrics``)."""
    payload = {"kind": "linear", "step": info.get("iters", 0),
               "state_dict": {"weight": head.weight.detach().cpu(), "bias": head.bias.detach().cpu()}, **info}
    if encoder_state is not None:  # fine-tuned: the encoder belongs to the result
        payload["encoder"] = {k: v.detach().cpu() for k, v in encoder_state.items()}
    card = {"kind": "linear", "in_dim": int(head.weight.shape[1]), "classes": int(head.weight.shape[0]),
            "metrics": info.get("metrics", {})}
    return ckpt_lib.save_checkpoint(path, payload, card)


def load_head(path, trust: bool = False) -> dict:
    """Load a linear head from our checkpoint or the spec's. Returns a dict with ``weight`` (C, d),
    ``bias`` (C,), ``info`` (our saved fields or the spec's hparams) and ``encoder`` (fine-tuned
    encoder state dict, or None)."""
    ck = ckpt_lib.read(path, trust=trust)
    encoder_state = None
    if ck.get("format") == ckpt_lib.FORMAT:
        if ck.get("kind") != "linear":
            raise CheckpointError(f"{path} is a {ck.get('kind', '?')} checkpoint, not a linear head; pass the "
                                  f"encoder as --encoder_ckpt and a saved head as --ckpt")
        sd, info, encoder_state = ck.get("state_dict", {}), {k: v for k, v in ck.items() if k not in
                                                             ("state_dict", "encoder")}, ck.get("encoder")
    elif isinstance(ck.get("state_dict"), dict):
        hp = ck.get("hparams")
        info = {"hparams": vars(hp) if hasattr(hp, "__dict__") else dict(hp or {})}
        sd = ck["state_dict"]
    else:
        sd, info = ck, {}
    sd = ckpt_lib.unwrap_state_dict(sd)
    if any(str(k).startswith(("convnet.", "conv1.", "layer1.")) for k in sd):
        raise CheckpointError(f"{path} holds encoder weights, not a linear head; pass it as --encoder_ckpt")
    w, b = sd.get("weight"), sd.get("bias")
    if not (isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor) and w.dim() == 2 and b.dim() == 1
            and b.shape[0] == w.shape[0]):
        raise CheckpointError(f"{path} is not a linear head: expected weight (C, d) and bias (C,) in its "
                              f"state_dict, found {ckpt_lib.describe(sd)}")
    return {"weight": w.float(), "bias": b.float(), "info": info, "encoder": encoder_state}


def head_from_state(state: dict, device="cpu") -> nn.Linear:
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0]).to(device)
    with torch.no_grad():
        head.weight.copy_(state["weight"])
        head.bias.copy_(state["bias"])
    return head
