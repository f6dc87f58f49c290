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
import signal
import sys
from typing import Sequence

from . import __version__
from . import config as config_lib
from .errors import UserError

COMMANDS = {
    "pretrain": ("simclr.cli:pretrain_main", "SimCLR pretraining (YAML config + --key value overrides)"),
    "eval": ("simclr.cli:eval_main", "evaluate an encoder: linear, fast-linear, kNN, fine-tune, transfer, eval-only"),
    "knn": ("simclr.cli:knn_main", "weighted or majority kNN accuracy of an encoder's frozen features"),
    "runs": ("simclr.runs.cli:runs_main", "table of all runs under a folder (status, progress, kNN, linear top-1)"),
    "report": ("simclr.report.cli:report_main", "write an HTML report with plots and pictures into a run folder"),
    "compare": ("simclr.report.cli:compare_main", "plot two or more runs together and list their config differences"),
    "export": ("simclr.export:export_main", "export an encoder: torchvision-named .pth or safetensors + model card"),
    "embed": ("simclr.export:embed_main", "features of every image in a folder -> .npy (+ ordered file list)"),
    "bench": ("simclr.bench:main", "throughput of the reference input/compute path vs the fast path, same run"),
}


class StopSignals:
    """First SIGTERM/SIGINT: ask the job to stop after the current step and save (``requested`` turns True).
    A second one exits at once with 128+signal. Installed only by the entry point, only in the main thread."""

    def __init__(self):
        self.requested = False
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

    def _handle(self, signum, frame):
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
        print(n, file=sys.stderr)


def pretrain_main(argv: Sequence[str]) -> int:
    from .options import PretrainConfig
    cfg, notes = config_lib.parse(PretrainConfig, argv)
    if cfg.problem != "sim-clr":
        raise UserError(f"this config has problem: {cfg.problem}; run it with `simclr eval` "
                        f"(or `python train.py`, which picks the job from the config)")
    _notes(notes)
    from . import distributed, launch
    if launch.maybe_spawn(cfg, list(argv), _pretrain_process):
        return 0
    from .train import pretrain
    try:
        with StopSignals() as stop:
            result = pretrain(cfg, should_stop=stop)
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
        print("\n".join(summary))
    return 0


def _eval(argv: Sequence[str], extra: dict) -> int:
    from .evaluate.run import run_eval, summary
    from .options import EvalConfig
    cfg, notes = config_lib.parse(EvalConfig, argv, extra=extra)
    if cfg.problem != "eval":
        raise UserError(f"this config has problem: {cfg.problem}; run it with `simclr pretrain` "
                        f"(or `python train.py`, which picks the job from the config)")
    _notes(notes)
    print(summary(run_eval(cfg)))
    return 0


def eval_main(argv: Sequence[str]) -> int:
    return _eval(argv, {})


def knn_main(argv: Sequence[str]) -> int:
    return _eval(argv, {"protocol": "knn"})


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
    """``python train.py ...`` (the spec's form): route to pretrain or eval by ``problem``."""
    argv = list(argv)
    try:
        path, overrides, _ = config_lib.split_argv([a for a in argv if a not in ("-h", "--help")])
        problem = overrides.get("problem") or (config_lib.load_yaml(path).get("problem") if path else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if problem not in (None, "sim-clr", "eval"):
        print(f"error: option 'problem' got {config_lib.shown(problem)}; allowed: sim-clr, eval", file=sys.stderr)
        return 2
    return run_command("eval" if problem == "eval" else "pretrain", argv)


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
        return int(getattr(importlib.import_module(module), func)(list(argv)) or 0)
    except config_lib.ShowHelp as h:
        print(str(h))
        return 0
    except UserError as e:
        print(f"error: {_clean(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
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
