"""``simclr eval`` and ``simclr knn``: load an encoder, pick the labelled data, run one protocol
(linear, fast-linear, kNN; semi-supervised, fine-tuning, transfer and eval-only are options of
them), and write ``eval.json`` — the same structure whatever the protocol — into a run folder.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import config as config_lib
from ..options import EvalConfig
from ..data import balanced_indices, get_dataset
from ..checkpoint import resolve, unpin
from ..errors import CheckpointError, ConfigError, DataError, UserError
from ..files import sha256_file
from ..rundir import RunDir, check_kind, check_run_folder, environment
from ..trackers import require
from ..weights import Encoder, load_encoder
from .fast_linear import fast_linear_probe, parse_grid
from .features import FeatureCache, augment_transform, dataset_fingerprint, extract_augmented, extract_features
from .knn import accuracy_report, knn_predict
from .linear import head_from_state, load_head, predict, save_head, train_on_features, train_on_images

TRAIN_AUG_SEED, TEST_AUG_SEED = 0, 1  # fixed, so augmented copies are cacheable across runs


# --------------------------------------------------------------------------------------------
# the evaluation context: device, encoder, data, cache, run folder
# --------------------------------------------------------------------------------------------
class Evaluation:
    def __init__(self, cfg: EvalConfig):
        from ..runtime import autocast_dtype, resolve_device
        self.cfg = cfg
        self.t0 = time.time()
        require(cfg.logger, cfg.mlflow_uri)  # a tracker that is not installed stops the job before any work
        self.kind = "knn" if cfg.protocol == "knn" and not cfg.compare else "eval"
        if cfg.run_dir and Path(cfg.run_dir).is_dir():  # a folder of another kind is refused before any work
            check_run_folder(Path(cfg.run_dir))
            check_kind(Path(cfg.run_dir), self.kind)
        self.device = resolve_device(cfg.device)
        self.amp = autocast_dtype(cfg.precision, self.device)
        if cfg.seed < 0:  # a random-init baseline is reproducible by default (seed 0); a trained encoder draws one
            cfg.seed = 0 if not cfg.encoder_ckpt else random.SystemRandom().randrange(2 ** 31)
        torch.manual_seed(cfg.seed)
        self.aug = cfg.augmentation if cfg.aug else "none"
        self.layer = cfg.encode_layer
        self.head_state = None
        if cfg.eval_only:
            if not cfg.ckpt:
                raise ConfigError("--eval_only true needs --ckpt PATH (a saved linear head)")
            if cfg.protocol == "knn" or cfg.compare:
                raise ConfigError("--eval_only evaluates a saved linear head: use it with --protocol linear "
                                  "and without --compare")
            self.head_state = load_head(cfg.ckpt, cfg.trust_checkpoint)
            saved = self.head_state["info"].get("config") or {}
            if saved.get("encode_layer") and saved["encode_layer"] != self.layer:
                self.print(f"note: the head was trained on encode_layer {saved['encode_layer']}; using it")
                self.layer = saved["encode_layer"]
        self.encoder, self.encoder_hash = self._load_encoder()
        if self.head_state is not None and self.head_state["encoder"] is not None:
            self.encoder.model.load_state_dict(self.head_state["encoder"])  # a fine-tuned result
            self.encoder_hash = ""  # its features are not those of the encoder file: no cache
        train_encoder = cfg.finetune and not cfg.eval_only
        for p in self.encoder.parameters():  # parameters fixed by design (bn2's bias) stay fixed
            p.requires_grad_(p.requires_grad and train_encoder)
        self.encoder.eval()
        self.image_size = cfg.image_size or self.encoder.input_size
        if self.head_state is not None:  # a head that does not fit fails before any data is read
            self._check_head_dim(self.head_state["weight"])
        self._load_data()
        self.cache = FeatureCache(self.encoder_hash, cfg.cache_features, log=self.print)
        self.run = RunDir.create(cfg.root, cfg.name, cfg.run_dir, kind=self.kind)
        config_lib.save(cfg, self.run.path / "config.yaml", run_dir="")
        self.run.write_json("env.json", environment(str(self.device)))
        self.run.track(cfg.logger, config_lib.to_dict(cfg), cfg.name, cfg.mlflow_uri)
        if self.run.trackers.live:
            self.print(f"trackers: {self.run.trackers.describe()}")
        self.run.set_status("running", protocol=cfg.protocol)

    def print(self, msg: str) -> None:
        if self.cfg.verbose:
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stderr)
        if getattr(self, "run", None) is not None:
            self.run.log(msg)

    # --- encoder ---------------------------------------------------------------------------
    def _load_encoder(self) -> tuple[Encoder, str]:
        cfg = self.cfg
        if cfg.encoder_ckpt:  # a run folder means its newest valid checkpoint; recorded as the file it took
            cfg.encoder_ckpt = str(resolve(cfg.encoder_ckpt))  # a run folder's is pinned against pruning ...
            try:
                enc = load_encoder(cfg.encoder_ckpt, trust=cfg.trust_checkpoint, device=self.device)
                digest = sha256_file(Path(cfg.encoder_ckpt))
            finally:
                unpin(Path(cfg.encoder_ckpt))  # ... until it is read
        else:
            from ..data import native_size
            from ..models import build_model, is_timm
            size = native_size(cfg.data, cfg.image_size)
            width = "" if is_timm(cfg.encoder_arch) else f"width {cfg.encoder_width}, "
            self.print(f"note: no --encoder_ckpt given: evaluating a randomly initialised {cfg.encoder_arch} "
                       f"({width}seed {cfg.seed}) — a baseline, not a trained encoder")
            model = build_model(SimpleNamespace(arch=cfg.encoder_arch, width=cfg.encoder_width, proj_layers=2,
                                                proj_dim=128, timm_kwargs=cfg.timm_kwargs), size)
            enc, digest = Encoder(model, size, "random-init").to(self.device), ""
        if self.layer != "h":
            with torch.no_grad():  # fail now, not after minutes of feature extraction
                try:
                    enc.encode(torch.zeros(2, 3, enc.input_size, enc.input_size, device=self.device), self.layer)
                except ValueError as e:
                    raise ConfigError(f"option 'encode_layer': {e}") from None
        return enc, digest

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(x, self.layer)

    # --- data ------------------------------------------------------------------------------
    def _load_data(self) -> None:
        cfg = self.cfg
        full = get_dataset(cfg.data, "train", cfg.data_path, self.image_size)
        test = get_dataset(cfg.data, "test", cfg.data_path, self.image_size)
        labelled = [i for i, t in enumerate(full.targets) if t >= 0]
        if len(labelled) < len(full):
            full = full.subset(labelled)
        if list(test.classes) != list(full.classes):
            raise DataError(f"the test split's classes differ from the training split's "
                            f"({len(test.classes)} vs {len(full.classes)}); both need the same class folders")
        if cfg.train_subset and cfg.train_subset < len(full):  # the pool (e.g. a small CPU run)
            full = full.subset(balanced_indices(full.targets, cfg.train_subset, 0))
        self.unlabeled = None
        if 0 < cfg.train_size < len(full):
            idx = balanced_indices(full.targets, cfg.train_size, cfg.data_split_seed)
            self.train = full.subset(idx)
            if cfg.acc_on_unlabeled:
                rest = sorted(set(range(len(full))) - set(idx))
                self.unlabeled = full.subset(rest)
        else:
            if cfg.acc_on_unlabeled:
                raise ConfigError("--acc_on_unlabeled true needs --train_size N smaller than the training split")
            self.train = full
        if cfg.test_subset and cfg.test_subset < len(test):
            test = test.subset(balanced_indices(test.targets, cfg.test_subset, 0))
        self.test = test
        self.classes = list(full.classes)
        self.n_classes = len(self.classes)
        if self.n_classes < 2:
            raise DataError(f"{cfg.data} has {self.n_classes} class; evaluation needs at least 2")

    # --- features ------------------------------------------------------------------------
    def plain(self, images, split: str):
        cfg = self.cfg
        bs = cfg.precompute_emb_bs if cfg.precompute_emb_bs > 0 else cfg.test_bs

        def compute():
            self.print(f"extracting features: {split} ({len(images)} images, layer {self.layer})")
            return extract_features(self.encode, images, self.image_size, bs, cfg.workers, self.device, self.amp,
                                    progress=cfg.verbose)

        f, y = self.cache.get(compute, kind="plain", data=dataset_fingerprint(images), layer=self.layer,
                              size=self.image_size)
        return f.to(self.device), y.to(self.device)

    def augmented(self, images, split: str, copies: int, seed: int):
        cfg = self.cfg
        native = getattr(images, "images", None)
        transform = augment_transform(self.aug, self.image_size, native.shape[1] if native is not None else -1,
                                      cfg.scale_lower)

        def compute():
            self.print(f"extracting features: {copies} augmented copies of {split} ({len(images)} images, "
                       f"{self.aug})")
            return extract_augmented(self.encode, images, transform, copies, seed, cfg.test_bs, cfg.workers,
                                     self.device, self.amp, progress=cfg.verbose)

        f, y = self.cache.get(compute, kind="augmented", aug=self.aug, scale_lower=cfg.scale_lower,
                              copies=copies, seed=seed, data=dataset_fingerprint(images), layer=self.layer,
                              size=self.image_size)
        return f.to(self.device), y.to(self.device)

    def train_features(self):
        if self.aug != "none" and self.cfg.n_augs_train > 0:
            return self.augmented(self.train, "train", self.cfg.n_augs_train, TRAIN_AUG_SEED)
        return self.plain(self.train, "train")

    def test_features(self):
        if self.aug != "none" and self.cfg.n_augs_test > 0:
            return self.augmented(self.test, "test", self.cfg.n_augs_test, TEST_AUG_SEED)
        return self.plain(self.test, "test")

    # --- protocols -------------------------------------------------------------------------
    def protocol_variant(self) -> str:
        """What the head was trained and tested on, named for eval.json ``details.protocol_variant``:
        on-the-fly (the spec's problem eval: a fresh augmentation every step, frozen encoder in eval
        mode), precomputed-augmented-copies (n_augs_train fixed copies), precomputed-features (aug off:
        one plain image each), finetune; then ``+test-time-averaging`` when n_augs_test copies of each
        test image are averaged (otherwise one plain test image per test sample)."""
        cfg = self.cfg
        augmenting = self.aug != "none"
        if cfg.eval_only:
            train = "eval-only"
        elif cfg.finetune and cfg.protocol == "linear":
            train = "finetune"
        elif augmenting and cfg.n_augs_train > 0:
            train = "precomputed-augmented-copies"
        elif augmenting and cfg.protocol == "linear":
            train = "on-the-fly"
        else:
            train = "precomputed-features"
        tta = augmenting and cfg.n_augs_test > 0 and cfg.protocol != "knn"
        return train + ("+test-time-averaging" if tta else "")

    def unlabeled_features(self):
        """The spec tests the unlabelled rest like the test split (averaged copies when n_augs_test is set)."""
        if self.aug != "none" and self.cfg.n_augs_test > 0:
            return self.augmented(self.unlabeled, "unlabelled rest of train", self.cfg.n_augs_test, TEST_AUG_SEED)
        return self.plain(self.unlabeled, "unlabelled rest of train")

    def head_report(self, head, finetuned: bool = False) -> tuple[dict, dict]:
        if finetuned:  # the encoder changed: its features are not the cached ones
            self.cache = FeatureCache("", False)
        f, y = self.test_features()
        res = accuracy_report(predict(head, f), y, self.classes)
        details = {}
        if self.unlabeled is not None:
            fu, yu = self.unlabeled_features()
            details["unlabeled_top1"] = accuracy_report(predict(head, fu), yu, self.classes)["top1"]
            details["n_unlabeled"] = len(self.unlabeled)
        return res, details

    def linear(self) -> dict:
        cfg = self.cfg
        if self.head_state is not None:
            head = head_from_state(self.head_state, self.device)
            self._check_head(head)
            res, details = self.head_report(head)
            saved = self.head_state["info"].get("metrics") or {}
            details.update(eval_only=True, head_source=cfg.ckpt, saved_top1=saved.get("top1"))
            return dict(res, details=details, head_ckpt=None)
        if cfg.finetune:
            transform = augment_transform(self.aug, self.image_size, self._native(self.train), cfg.scale_lower)
            self.print(f"fine-tuning the encoder (lr {cfg.encoder_lr if cfg.encoder_lr >= 0 else cfg.lr}) and a "
                       f"linear head (lr {cfg.lr}) on {len(self.train)} images for {cfg.iters} steps")
            head = train_on_images(self.encoder, self.encode, self.train, transform, self.n_classes,
                                   self._feat_dim(), cfg, self.device, self.amp, finetune=True, seed=cfg.seed,
                                   progress=cfg.verbose, on_step=self._periodic_save)
            res, details = self.head_report(head, finetuned=True)
            details["finetune"] = True
        elif self.aug == "none" or cfg.n_augs_train > 0:
            f, y = self.train_features()
            self.print(f"training the linear head on {'x'.join(map(str, f.shape[:-1]))} precomputed features "
                       f"(dim {f.shape[-1]}) for {cfg.iters} steps")
            head = train_on_features(f, y, self.n_classes, cfg, seed=cfg.seed, progress=cfg.verbose,
                                     on_step=self._periodic_save)
            res, details = self.head_report(head)
        else:
            transform = augment_transform(self.aug, self.image_size, self._native(self.train), cfg.scale_lower)
            self.print(f"training the linear head on {self.aug}-augmented images (frozen encoder, features "
                       f"computed every step) for {cfg.iters} steps")
            head = train_on_images(self.encoder, self.encode, self.train, transform, self.n_classes,
                                   self._feat_dim(), cfg, self.device, self.amp, finetune=False, seed=cfg.seed,
                                   progress=cfg.verbose, on_step=self._periodic_save)
            res, details = self.head_report(head)
        details["fit"] = "sgd"
        path = self.save_head(head, res, "linear", finetuned=cfg.finetune)
        return dict(res, details=details, head_ckpt=str(path))

    def fast_linear(self) -> dict:
        cfg = self.cfg
        if cfg.finetune:
            raise ConfigError("--finetune true trains the encoder, which the fast linear probe does not; use "
                              "--protocol linear")
        f, y = self.train_features()
        self.print(f"fast linear probe: L-BFGS logistic regression on {'x'.join(map(str, f.shape[:-1]))} "
                   f"features (dim {f.shape[-1]})")
        head, details = fast_linear_probe(f, y, self.n_classes, parse_grid(cfg.l2_grid), cfg.holdout,
                                          cfg.fast_iters, seed=cfg.data_split_seed, log=self.print)
        res, extra = self.head_report(head)
        details.update(extra, fit="lbfgs")
        path = self.save_head(head, res, "fast-linear")
        return dict(res, details=details, head_ckpt=str(path))

    def knn(self) -> dict:
        cfg = self.cfg
        if cfg.finetune:
            raise ConfigError("--finetune true is for --protocol linear; kNN uses the frozen encoder")
        tr_f, tr_y = self.plain(self.train, "train")
        te_f, te_y = self.plain(self.test, "test")
        weighted = cfg.knn_vote == "weighted"
        scores = knn_predict(tr_f, tr_y, te_f, cfg.k, cfg.temperature, weighted, self.n_classes)
        res = accuracy_report(scores, te_y, self.classes)
        details = {"k": min(cfg.k, len(tr_y)), "vote": cfg.knn_vote, "similarity": "cosine"}
        if weighted:
            details["temperature"] = cfg.temperature
        if self.unlabeled is not None:
            fu, yu = self.plain(self.unlabeled, "unlabelled rest of train")
            details["unlabeled_top1"] = accuracy_report(
                knn_predict(tr_f, tr_y, fu, cfg.k, cfg.temperature, weighted, self.n_classes), yu)["top1"]
        return dict(res, details=details, head_ckpt=None)

    # --- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _native(images) -> int:
        arr = getattr(images, "images", None)
        return arr.shape[1] if arr is not None else -1

    def _feat_dim(self) -> int:
        with torch.no_grad():
            x = torch.zeros(2, 3, self.image_size, self.image_size, device=self.device)
            return int(self.encode(x).shape[1])

    def _check_head_dim(self, weight: torch.Tensor) -> None:
        d = self._feat_dim()
        if weight.shape[1] != d:
            raise CheckpointError(f"{self.cfg.ckpt}: the head expects {weight.shape[1]}-dim features but the "
                                  f"encoder gives {d} at layer {self.layer} (another encoder or encode_layer?)")

    def _check_head(self, head) -> None:
        self._check_head_dim(head.weight)
        c = self.n_classes
        if head.weight.shape[0] != c:
            raise CheckpointError(f"{self.cfg.ckpt}: the head has {head.weight.shape[0]} classes but "
                                  f"{self.cfg.data} has {c}")

    def _periodic_save(self, step: int, head) -> None:
        """Every ``ckpt_iter`` steps: the head so far (no test accuracy yet) and a metrics line."""
        cfg = self.cfg
        if cfg.ckpt_iter > 0 and step % cfg.ckpt_iter == 0 and step < cfg.iters:
            path = self.run.path / "checkpoints" / f"linear-head-{step:08d}.pt"
            info = {"iters": step, "fit": "linear", "config": config_lib.to_dict(cfg), "encode_layer": self.layer,
                    "encoder_sha256": self.encoder_hash, "classes": self.classes, "metrics": {}}
            save_head(path, head, info, self.encoder.model.state_dict() if cfg.finetune else None)
            self.run.log_metrics({"step": step, "event": "head_checkpoint"})

    def save_head(self, head, res: dict, fit: str, finetuned: bool = False) -> Path:
        cfg = self.cfg
        name = "finetuned.pt" if finetuned else ("fast-linear-head.pt" if fit == "fast-linear" else "linear-head.pt")
        path = self.run.path / "checkpoints" / name
        info = {"iters": cfg.iters, "fit": fit, "config": config_lib.to_dict(cfg), "encode_layer": self.layer,
                "encoder_sha256": self.encoder_hash, "encoder_ckpt": cfg.encoder_ckpt, "classes": self.classes,
                "image_size": self.image_size,
                "metrics": {"top1": res["top1"], "top5": res["top5"], "n_test": res["n"]}}
        save_head(path, head, info, self.encoder.model.state_dict() if finetuned else None)
        return path


# --------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------
def run_eval(cfg: EvalConfig) -> dict:
    """Run ``cfg.protocol`` (and, with ``compare``, both linear protocols); write eval.json."""
    ev = Evaluation(cfg)
    try:
        ev.print(f"evaluating {ev.encoder.name} from {cfg.encoder_ckpt or 'random init'} "
                 f"(sha256 {ev.encoder_hash[:12] or '-'}) on {cfg.data}: {len(ev.train)} labelled training "
                 f"images, {len(ev.test)} test images, {ev.image_size}px, {ev.device}; run folder {ev.run.path}")
        runners = {"linear": ev.linear, "fast-linear": ev.fast_linear, "knn": ev.knn}
        t = time.time()
        res = runners[cfg.protocol]()
        res["seconds"] = time.time() - t
        compare = None
        if cfg.compare:
            other = "fast-linear" if cfg.protocol == "linear" else "linear"
            t = time.time()
            second = runners[other]()
            second["seconds"] = time.time() - t
            both = {cfg.protocol: res, other: second}
            if "linear" not in both:  # protocol knn: compare the two linear ones
                both["linear"] = ev.linear()
            compare = {k: {"top1": v["top1"], "top5": v["top5"], "seconds": v.get("seconds")}
                       for k, v in both.items()}
            compare["difference"] = both["fast-linear"]["top1"] - both["linear"]["top1"]
        result = {
            "kind": "eval" if cfg.encoder_ckpt else "baseline",
            "protocol": "eval-only" if cfg.eval_only else cfg.protocol + ("+finetune" if cfg.finetune else ""),
            "top1": res["top1"], "top5": res["top5"], "per_class": res["per_class"], "confusion": res.get("confusion"),
            "n_train": 0 if cfg.eval_only else len(ev.train), "n_test": res["n"], "classes": ev.classes,
            "encoder": {"path": cfg.encoder_ckpt, "sha256": ev.encoder_hash, "arch": ev.encoder.name,
                        "feat_dim": ev.encoder.feat_dim, "layer": ev.layer, "input_size": ev.encoder.input_size,
                        "random_init": not cfg.encoder_ckpt},
            "data": {"name": cfg.data, "path": cfg.data_path, "image_size": ev.image_size,
                     "train_size": cfg.train_size, "data_split_seed": cfg.data_split_seed,
                     "augmentation": ev.aug, "n_augs_train": cfg.n_augs_train, "n_augs_test": cfg.n_augs_test},
            "details": dict(res["details"], protocol_variant=ev.protocol_variant(), problem=cfg.problem),
            "head_ckpt": res["head_ckpt"], "compare": compare,
            "feature_cache_hits": ev.cache.hits, "seconds": time.time() - ev.t0, "device": str(ev.device),
            "config": config_lib.to_dict(cfg), "run_dir": str(ev.run.path),
        }
        # paths inside the run folder are recorded relative to it: a copied folder describes itself
        ev.run.write_json("eval.json", dict(result, run_dir=".", head_ckpt=_relative(result["head_ckpt"], ev.run.path)))
        ev.run.log_metrics({"step": cfg.iters, "top1": result["top1"], "top5": result["top5"]})
        ev.run.trackers.results(result, cfg.iters, "eval.json")
        ev.run.set_status("finished", top1=result["top1"], top5=result["top5"])
        return result
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        try:
            ev.run.set_status(status, error=f"{type(e).__name__}: {e}")
        except (OSError, UserError):
            pass
        raise
    finally:
        ev.run.close()


def _relative(path, run: Path):
    """``path`` relative to the run folder ``run`` when it lies inside it."""
    if not path:
        return path
    try:
        return str(Path(path).relative_to(run))
    except ValueError:
        return str(path)
