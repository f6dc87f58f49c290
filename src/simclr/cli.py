"""``simclr <command> [options]``: the entry point. Thin: parse, build, call; and it owns the process.

Each command is registered in COMMANDS as ``name: ("module:function", "one-line description")``; the
function takes the argument list and returns an exit code. Only this module installs signal handlers,
calls ``sys.exit`` and turns errors into output: bad input (:class:`simclr.errors.UserError`) is one
``error:`` line and exit code 2, never a traceback; ``--help`` anywhere prints that command's options.
"""
from __future__ import annotations

import atexit
import importlib
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from . import config as config_lib
from .errors import ConfigError, UserError
from .progress import printable

COMMANDS = {
    "pretrain": ("simclr.cli:pretrain_main", "SimCLR pretraining (YAML config + --key value overrides)"),
    "eval": ("simclr.cli:eval_main", "evaluate an encoder: linear, fast-linear, kNN, fine-tune, transfer, eval-only"),
    "knn": ("simclr.cli:knn_main", "weighted or majority kNN accuracy of an encoder's frozen features"),
    "runs": ("simclr.runs.cli:runs_main", "table of all runs under a folder (status, progress, kNN, linear top-1)"),
    "report": ("simclr.report.cli:report_main", "write an HTML report with plots and pictures into a run folder"),
    "compare": ("simclr.report.cli:compare_main", "plot two or more runs together and list their config differences"),
    "export": ("simclr.cli:export_main", "export an encoder: torchvision-named .pth or safetensors + model card"),
    "embed": ("simclr.cli:embed_main", "features of every image in a folder -> .npy (+ ordered file list)"),
    "bench": ("simclr.bench:main", "throughput of the reference input/compute path vs the fast path, same run"),
}


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT while a job has nothing to save (a set-up, feature extraction): stop now, exit 128+signal."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


class StopSignals:
    """First SIGTERM/SIGINT: ask the job to stop after the current step and save (``requested`` turns True).
    A second one exits at once with 128+signal. With ``at_once`` (pretraining and the SGD linear evaluation until
    :meth:`graceful`: their set-up — data scan, rendezvous, model, features — has nothing to save) the first one raises
    :class:`Interrupted`. Installed explicitly, so it works even where the shell started us with SIGINT ignored
    (a background job), and only by the entry point, only in the main thread."""

    def __init__(self, at_once: bool = False):
        self.requested, self.at_once = False, at_once
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def __call__(self) -> bool:
        return self.requested

    def graceful(self) -> None:
        """From now on the first signal asks for a stop after the current step (the training loop has begun)."""
        self.at_once = False

    def _handle(self, signum, frame):
        if self.at_once:
            raise Interrupted(signum)
        if self.requested:
            print(f"\nsecond signal {signum}: exiting now", file=sys.stderr, flush=True)
            sys.exit(128 + signum)
        self.requested = True
        print(f"\nsignal {signum}: stopping after this step and saving a checkpoint "
              f"(send again to exit at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _notes(notes) -> None:
    for n in notes:
        print(printable(n), file=sys.stderr)


def _with_run_config(argv: Sequence[str], schema=None, kind: str = "") -> tuple[list, dict]:
    """``--resume RUN_DIR`` without ``--config``: the run's own config.yaml is the base, so a plain resume
    continues the same run (the command line still overrides it). Its location is RUN_DIR whatever folder the
    file names (a copied run resumes as the copy). Returns (argv, values between the file and the command line).
    ``schema``: the command's options (default pretraining's); ``kind``: only a run folder of this kind."""
    from .files import check_own
    from .options import PretrainConfig
    from .rundir import folder_kind
    argv = list(argv)
    config_path, overrides, _ = config_lib.split_argv(argv, schema or PretrainConfig)
    run = Path(str(overrides.get("resume", "")))
    if (config_path is None and str(run) not in ("", ".", "auto") and run.is_dir() and check_own(run / "config.yaml")
            and (not kind or folder_kind(run) == kind)):
        return ["--config", str(run / "config.yaml"), *argv], {"run_dir": ""}
    return argv, {}


def _shown_path(path: Path) -> str:
    """``path`` as a user can type it from here: relative below the current folder, else absolute."""
    path = Path(os.path.abspath(path))
    try:
        rel = path.relative_to(Path.cwd())
    except ValueError:
        return shlex.quote(str(path))
    return shlex.quote(str(rel) if rel.parent != Path(".") else f"./{rel}")


def _on_path(name: str, target: Path) -> bool:
    """Whether typing ``name`` runs ``target`` itself (not another install of the same name)."""
    import shutil
    found = shutil.which(name)
    return found is not None and os.path.abspath(found) == os.path.abspath(target)


def program() -> str:
    """How to type the command that runs this package again, as is: ``python train.py`` for train.py users,
    ``simclr`` when PATH finds this interpreter's script, else the script's path (``.venv/bin/simclr``: a
    venv that is not activated), else ``python -m simclr``."""
    exe = Path(sys.executable)
    python = next((n for n in ("python", "python3") if _on_path(n, exe)), None) or _shown_path(exe)
    if Path(sys.argv[0]).name == "train.py":
        return f"{python} {_shown_path(Path(sys.argv[0]))}"
    script = exe.parent / "simclr"
    if _on_path("simclr", script):
        return "simclr"
    if script.is_file():
        return _shown_path(script)
    return f"{python} -m simclr"


def resume_command(run_dir: str, cfg=None, job: str = "pretrain") -> str:
    """The command that continues ``run_dir`` (of ``job``: pretrain or eval). A run over several nodes (``--dist ddp
    --world_size N``) resumes with each node's own ``--node_rank``: config.yaml holds node 0's, so a plain resume
    would make every node 0."""
    if Path(sys.argv[0]).name == "train.py":  # train.py picks the job from the run's config
        command = f"{program()} --resume {shlex.quote(str(run_dir))}"
    else:
        command = f"{program()} {job} --resume {shlex.quote(str(run_dir))}"
    nodes = getattr(cfg, "world_size", 1) if getattr(cfg, "dist", "") == "ddp" and job == "pretrain" else 1
    if nodes > 1:
        command += (f" --node_rank {cfg.node_rank} (on every one of the {nodes} nodes, each with its own --node_rank "
                    f"0 to {nodes - 1})")
    return command


def _tracker_environment(cfg) -> None:
    """What the trackers named in ``--logger`` need set in the environment (the entry point owns it)."""
    from .trackers import environment
    for key, value in environment(cfg.logger, cfg.mlflow_uri).items():
        os.environ.setdefault(key, value)


def pretrain_main(argv: Sequence[str]) -> int:
    from .options import PretrainConfig
    cfg, notes = config_lib.parse(PretrainConfig, *_with_run_config(argv))
    if cfg.problem != "sim-clr":
        raise UserError(f"this config has problem: {cfg.problem}; run it with `simclr eval` "
                        f"(or `python train.py`, which picks the job from the config)")
    _notes(notes)
    _tracker_environment(cfg)
    from . import distributed, launch
    _notes([n for n in [launch.dp_note(cfg)] if n])
    if launch.maybe_spawn(cfg, list(argv), _pretrain_process):
        return 0
    from .train import pretrain
    try:
        with StopSignals(at_once=True) as stop:
            result = pretrain(cfg, should_stop=stop, started=stop.graceful)
    except UserError as e:
        if getattr(e, "run_dir", ""):
            e.resume_command = resume_command(e.run_dir, cfg)
        raise
    finally:
        if distributed.is_broken():  # a peer died: the interpreter's teardown of the group could hang
            atexit.register(_hard_exit)
    if result.get("run_dir"):
        summary = [f"run folder: {result['run_dir']}", f"status: {result['status']} at step {result['step']}"]
        if "knn_start_top1" in result:
            summary.append(f"kNN top-1 at random init: {result['knn_start_top1']:.2f}%")
        if "knn_top1" in result:
            summary.append(f"kNN top-1 after pretraining: {result['knn_top1']:.2f}% "
                           f"(top-5 {result['knn_top5']:.2f}%)")
        if result["status"] == "interrupted":
            summary.append(f"continue with: {resume_command(result['run_dir'], cfg)}")
        print("\n".join(summary))
    return 0


def _eval(cfg, notes: list) -> int:
    from .evaluate.run import run_eval
    if cfg.problem not in ("eval", "semi-supervised-eval"):
        raise UserError(f"this config has problem: {cfg.problem}; run it with `simclr pretrain` "
                        f"(or `python train.py`, which picks the job from the config)")
    _notes(notes)
    _tracker_environment(cfg)
    with StopSignals(at_once=True) as stop:  # graceful once the SGD steps begin: a stop then saves the head
        result = run_eval(cfg, should_stop=stop, started=stop.graceful)
    if result.get("status") == "interrupted":
        print(f"run folder: {result['run_dir']}\nstatus: interrupted at step {result['step']} of {result['iters']}\n"
              f"continue with: {resume_command(result['run_dir'], cfg, 'eval')}")
        return 0
    print(summary(result))
    return 0


def summary(result: dict) -> str:
    """What `simclr eval` prints: the result, the protocol variant, where the head and the run folder are."""
    trained = f", {result['n_train']} labelled training images" if result["n_train"] else ""
    variant = result["details"].get("protocol_variant")
    lines = ["BASELINE: a randomly initialised encoder, not a trained one (pass --encoder_ckpt to evaluate yours)"
             ] if result.get("kind") == "baseline" else []
    shown = f"{result['protocol']}{f' ({variant})' if variant and variant != result['protocol'] else ''}"
    lines += [f"{shown}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
              f"({result['n_test']} test images{trained})"]
    if "unlabeled_top1" in result["details"]:
        lines.append(f"accuracy on the unlabelled rest of the training split: "
                     f"{result['details']['unlabeled_top1']:.2f}%")
    if result.get("compare"):
        c = result["compare"]
        lines.append(f"compare: linear top-1 {c['linear']['top1']:.2f}%  fast-linear top-1 "
                     f"{c['fast-linear']['top1']:.2f}%  (difference {c['difference']:+.2f} points)")
    if result.get("head_ckpt"):
        lines.append(f"linear head: {result['head_ckpt']}")
    lines.append(f"run folder: {result['run_dir']}")
    return "\n".join(lines)


def eval_main(argv: Sequence[str]) -> int:
    from .eval_options import EvalConfig
    return _eval(*config_lib.parse(EvalConfig, *_with_run_config(argv, EvalConfig, "eval")))


def knn_main(argv: Sequence[str]) -> int:
    """``simclr knn``: its own options (KnnConfig), run as ``simclr eval --protocol knn``."""
    from .eval_options import EvalConfig, KnnConfig
    knn, notes = config_lib.parse(KnnConfig, argv)
    return _eval(config_lib.build(EvalConfig, {**config_lib.to_dict(knn), "protocol": "knn"}), notes)


def export_main(argv: Sequence[str]) -> int:
    """``simclr export``: the options (ExportConfig), then :func:`simclr.export.export_encoder`."""
    from .export_options import ExportConfig
    a, _ = config_lib.parse(ExportConfig, argv)
    from .export import card_path, export_encoder
    from .names import is_named, is_timm
    card = export_encoder(a.ckpt, a.out, a.format, a.trust_checkpoint, a.include_head, a.force)
    out = Path(a.out)
    what = card["arch"] if is_named(card["arch"]) else f"{card['arch']} width {card['width']}"
    print(f"wrote {out} ({card['format']}, {what}, {card['feat_dim']}-d features, "
          f"{card['input_size']}px input, sha256 {card['sha256'][:16]}...)")
    print(f"model card: {card_path(out)}")
    if is_timm(card["arch"]):
        if card["timm_recipe"]:
            print("load it with timm:\n    " + "\n    ".join(card["timm_recipe"]).replace("PATH", repr(str(out))))
    elif card["torchvision_recipe"]:
        recipe = "\n    ".join(card["torchvision_recipe"]).replace("PATH", repr(str(out)))
        print("load it with torchvision:\n    " + recipe)
    elif is_named(card["arch"]):
        print(f"note: {card['arch']} is one of this project's backbones; load it with "
              f"simclr.load_encoder({str(out)!r})")
    elif not card["torchvision_loadable"]:
        print(f"note: {card['arch']} of width {card['width']} has no torchvision counterpart (torchvision's "
              f"ResNet-18 to 152 have width 64); load it with simclr.load_encoder({str(out)!r})")
    return 0


def embed_main(argv: Sequence[str]) -> int:
    """``simclr embed``: the options (EmbedConfig), then :func:`simclr.export.embed_images` into two files."""
    from .export_options import EmbedConfig
    a, _ = config_lib.parse(EmbedConfig, argv)
    import numpy as np

    from .export import claim_embedding, embed_images, files_list_path
    from .files import atomic_write
    from .runtime import resolve_device
    from .weights import load_encoder
    out = Path(a.out)
    claim_embedding(out, a.force)
    device = resolve_device(a.device)
    enc = load_encoder(a.encoder_ckpt, trust=a.trust_checkpoint, device=device)
    if a.layer not in ("h", "z") and int(a.layer[1:]) > enc.model.projection.layers:
        raise ConfigError(f"option 'layer' got {a.layer!r}; this head has {enc.model.projection.layers} layers")
    feats, names, skipped = embed_images(enc, Path(a.images), a.batch_size, a.workers, a.layer,
                                         a.skip_bad_images, device, progress=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # the pair is replaced together: the names go first, from inside the array's write (its bytes on disk,
        # not yet renamed), so a failure writing either leaves the earlier .npy and .files.txt as they were
        atomic_write(out, lambda f: np.save(f, feats),
                     before_replace=lambda _: atomic_write(files_list_path(out), "\n".join(names) + "\n"))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"wrote {out}: {feats.shape[0]} x {feats.shape[1]} float32 ({a.layer} of {enc.arch}, images at "
          f"{enc.input_size}px); file names in row order: {files_list_path(out)}")
    if skipped:
        print(printable(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}"), file=sys.stderr)
    return 0


def _pretrain_process(argv: list) -> None:
    """One process of a run that ``launch`` spawned: the same command, its exit code the process's."""
    code = run_command("pretrain", argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        sys.exit(code)


def _hard_exit() -> None:
    """Leave with code 2 without the interpreter's teardown, once the error line is out."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


def spec_main(argv: Sequence[str]) -> int:
    """``python train.py ...`` (the spec's form): route to pretrain (``sim-clr``) or eval (``eval``,
    ``semi-supervised-eval``) by ``problem``."""
    argv = list(argv)
    try:
        path, overrides, _ = config_lib.split_argv([a for a in argv if a not in ("-h", "--help")])
        problem = overrides.get("problem") or (config_lib.load_yaml(path).get("problem") if path else None)
        resumed = Path(str(overrides.get("resume", ""))) / "config.yaml"  # --resume RUN: the run's own job
        if problem is None and not path and str(overrides.get("resume", "")) not in ("", "auto") and resumed.is_file():
            problem = config_lib.load_yaml(str(resumed)).get("problem")
    except UserError as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return 2
    from .options import EVAL_PROBLEMS, PROBLEMS
    if problem not in (None, *PROBLEMS):
        print(f"error: option 'problem' got {config_lib.shown(problem)}; allowed: {', '.join(PROBLEMS)}",
              file=sys.stderr)
        return 2
    return run_command("eval" if problem in EVAL_PROBLEMS else "pretrain", argv)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: simclr <command> [options]   (simclr <command> --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def _clean(msg: str) -> str:
    # errors raised inside DataLoader workers come back wrapped with the worker's traceback
    if "Original Traceback" in msg:
        tail = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
        msg = tail.split(": ", 1)[1] if ": " in tail else tail
    return msg


def _closed_pipe() -> int:
    # `simclr ... | head`: the reader is gone; say nothing, and keep Python from complaining at exit
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass
    return 141


def run_command(name: str, argv: Sequence[str]) -> int:
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    try:
        try:
            return int(getattr(importlib.import_module(module), func)(list(argv)) or 0)
        except config_lib.ShowHelp as h:
            print(str(h), flush=True)
            return 0
    except UserError as e:
        print(f"error: {printable(_clean(str(e)))}", file=sys.stderr)
        if getattr(e, "run_dir", ""):  # a run that stopped on an error can be continued once it is fixed
            print(f"the run folder is {e.run_dir}; after fixing the cause continue with: "
                  f"{getattr(e, 'resume_command', '') or resume_command(e.run_dir)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted (signal {signum})", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        return _closed_pipe()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "-V", "version"):
        print(f"simclr {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_command(name, argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
