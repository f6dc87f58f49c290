"""Checkpoints: the one reader (:mod:`.reader`) and the one writer with the run folder's checkpoints (:mod:`.store`).

Our format (a dict saved with ``torch.save``):
    format="simclr", format_version, kind ("pretrain" | "linear" ...), step, config (plain dict),
    model (unwrapped state dict: no ``module.``/``_orig_mod.`` prefixes), optimizer, scaler,
    rng, metrics.
Beside every checkpoint ``X.pt`` lies ``X.json`` (``X.pth.json`` for exports): its SHA-256, size, step
and a short model card (architecture, data, metrics).

Callers import from here (``from simclr.checkpoint import read``); the submodules say which side a name is on.
"""
from .reader import (INFLATE_FREE, MAX_CARD_BYTES, MAX_INFLATE_RATIO, card_describes, describe, load_weights, read,
                     read_card, sniff)
from .store import (CARD_RE, CKPT_RE, FORMAT, FORMAT_VERSION, checkpoint_path, is_ours, latest_valid, list_checkpoints,
                    model_state, pin, prune, resolve, save_checkpoint, unpin, unwrap_state_dict, write_with_card)

__all__ = ["CARD_RE", "CKPT_RE", "FORMAT", "FORMAT_VERSION", "INFLATE_FREE", "MAX_CARD_BYTES", "MAX_INFLATE_RATIO",
           "card_describes", "checkpoint_path", "describe", "is_ours", "latest_valid", "list_checkpoints",
           "load_weights", "model_state", "pin", "prune", "read", "read_card", "resolve", "save_checkpoint", "sniff",
           "unpin", "unwrap_state_dict", "write_with_card"]
