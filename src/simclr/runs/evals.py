"""Evaluation runs in the index: what an eval.json says, and which pretraining run it evaluated.

An eval run names its encoder by path and by checksum (eval.json ``encoder: {path, sha256}``). The
path is tried first (a checkpoint inside ``<run>/checkpoints/``); when the file moved, the checksum is
matched against the model cards (``checkpoints/*.json``) of every run in the index.
"""
from __future__ import annotations

import os
from pathlib import Path

from .folder import read_json


def _encoder_path(ev: dict, cfg: dict) -> str:
    for src in (ev, ev.get("config") if isinstance(ev.get("config"), dict) else {}, cfg):
        for key in ("encoder_ckpt", "encoder", "encoder_path"):
            v = src.get(key)
            if isinstance(v, dict):
                v = v.get("path")
            if isinstance(v, str) and v:
                return v
    return ""


# eval.json protocols whose top-1 is a linear classifier on frozen features ("eval-only" re-scores a
# saved linear head); kNN's is the ``knn`` column; fine-tuning ("linear+finetune") is in eval_top1 only.
LINEAR_PROTOCOLS = ("linear", "fast-linear", "eval-only")


def encoder_sha(ev: dict) -> str:
    enc = ev.get("encoder")
    for v in (ev.get("encoder_sha256"), enc.get("sha256") if isinstance(enc, dict) else None):
        if isinstance(v, str) and v:
            return v
    return ""


def is_baseline(evals: list, cfg: dict) -> bool:
    """A random-init evaluation: eval.json says so, or (no result yet) the config names no encoder."""
    for ev in evals:
        enc = ev.get("encoder")
        if ev.get("kind") == "baseline" or (isinstance(enc, dict) and enc.get("random_init") is True):
            return True
    return not evals and cfg.get("problem") == "eval" and not cfg.get("encoder_ckpt")


def eval_summary(evals: list, cfg: dict) -> dict:
    """Index fields of an eval run: protocol, its top-1 (also as ``linear`` or ``knn`` by protocol), encoder."""
    out: dict = {}
    for ev in evals:
        protocol = str(ev.get("protocol") or cfg.get("protocol") or "eval")
        top1, top5 = ev.get("top1"), ev.get("top5")
        if not isinstance(top1, (int, float)):
            continue
        top5 = top5 if isinstance(top5, (int, float)) else None
        out.setdefault("protocol", protocol)
        out.setdefault("eval_top1", top1)
        out.setdefault("eval_top5", top5)
        if protocol in LINEAR_PROTOCOLS and top1 >= out.get("linear", float("-inf")):
            out["linear"] = top1
            if top5 is not None:
                out["linear_top5"] = top5
        if protocol == "knn" and top1 >= out.get("knn", float("-inf")):
            out["knn"], out["knn_top5"] = top1, top5
    enc = _encoder_path(evals[0], cfg) if evals else ""
    if enc:
        out["encoder_ckpt"] = enc
    sha = next((h for h in map(encoder_sha, evals) if h), "")
    if sha:
        out["encoder_sha256"] = sha
    return out


def eval_columns(evals: list, cfg: dict) -> dict:
    """Columns an eval row shows differently from a pretraining row, so one column means one thing.

    ``arch`` is the evaluated encoder's (the config's ``arch`` is the head: ``head``); ``temperature`` is
    NT-Xent's only (an eval's is the kNN tau: ``knn_tau``); a kNN evaluation trains nothing, so it has no
    batch size and no steps, and neither does a fast-linear fit (L-BFGS) or re-scoring a saved head."""
    enc = next((ev["encoder"] for ev in evals if isinstance(ev.get("encoder"), dict)), {})
    arch = enc.get("arch") or (cfg.get("encoder_arch") if not cfg.get("encoder_ckpt") else None)
    out = {"head": cfg.get("arch"), "arch": arch, "temperature": None, "knn_tau": cfg.get("temperature")}
    protocol = next((ev.get("protocol") for ev in evals if ev.get("protocol")), cfg.get("protocol"))
    if protocol == "linear" or str(protocol).startswith("linear+"):  # SGD on a head: its batch and steps
        if evals:  # finished: every step was taken (eval runs log no per-step records)
            out["step"] = cfg.get("iters")
    else:
        out.update(batch_size=None, iters=None, step=None)
    return out


def link_evals(rows: list) -> None:
    """Name in each eval row the run whose checkpoint it evaluated (``encoder_run``), and give that
    pretraining row the best linear top-1 among the eval runs of its checkpoints."""
    by_path = {}
    for r in rows:
        by_path[os.path.realpath(r["path"])] = r
    sha_cache: dict = {}
    for r in rows:
        if r["kind"] != "eval":
            continue
        target = None
        enc = r.get("encoder_ckpt")
        if enc:
            p = Path(enc)
            if not p.is_absolute():  # relative to the folder the eval was launched from
                env = read_json(Path(r["path"]) / "env.json")
                p = Path(env.get("cwd") if isinstance(env, dict) and env.get("cwd") else os.getcwd()) / p
            owner = p.parent.parent if p.parent.name == "checkpoints" else None
            target = by_path.get(os.path.realpath(owner)) if owner is not None else None
        if target is None and r.get("encoder_sha256"):
            if not sha_cache:  # checksums of every checkpoint card, read once and only when needed
                for t in rows:
                    for card in Path(t["path"], "checkpoints").glob("*.json"):
                        d = read_json(card)
                        if isinstance(d, dict) and d.get("sha256"):
                            sha_cache[d["sha256"]] = t
            target = sha_cache.get(r["encoder_sha256"])
        if target is not None and target is not r:
            r["encoder_run"] = target["path"]
            if "linear" in r and r["linear"] >= target.get("linear", float("-inf")):
                target["linear"] = r["linear"]
