#!/usr/bin/env python
"""Re-run the commands whose numbers the README and docs/ quote, and compare what they print with what is written.

    python scripts/readme_check.py            # run, compare, exit 1 with a diff when a number differs
    python scripts/readme_check.py --update   # run, then rewrite the numbers in place
    python scripts/readme_check.py --list     # the commands it would run, nothing run
    python scripts/readme_check.py 2>log; python scripts/readme_check.py --update --replay log   # no second run

Two markers, HTML comments (invisible on the rendered page), in README.md and docs/*.md:

    <!-- run ID: COMMAND -->       declares command ID; COMMAND must also be shown in the page's visible text
    VALUE<!-- check: ID.FIELD -->  a number that command ID prints (FIELD: a key of FIELDS) written right before

Commands run in the order they are declared (README.md first, then docs/ by name), each as its own process without
a shell: `simclr`, `python` and `python3` are this interpreter's, and `make TARGET` runs that target's one-line
recipe from the Makefile (`$(BIN)/` dropped). Runs are written into a temporary folder (SIMCLR_LOGS), not ./logs.
Variables a command may use: $ENC, the newest checkpoint of the last run folder printed that holds checkpoints
(the pretraining run); $RUN_<ID> and $HEAD_<ID>, the run folder and the `linear head:` that command ID printed.
`ID.minutes` (the command's wall time), `date` (today, UTC) and the versions `torch`, `torchvision` and `pillow`
(the numbers depend on them: Pillow resizes the CPU path's crops) are only rewritten by --update, never compared.
"""
from __future__ import annotations

import argparse
import datetime
import difflib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN_MARK = re.compile(r"<!--\s*run\s+([\w-]+):\s*(.+?)\s*-->")
CHECK_MARK = re.compile(r"(?P<value>\d[\d.-]*)(?P<pct>%?)<!--\s*check:\s*(?P<key>[\w.-]+)\s*-->")
COMMENT = re.compile(r"<!--.*?-->", re.S)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"`([^`\n]+)`")

# what each FIELD reads from a command's output (stdout and stderr together)
FIELDS = {
    "init": r"kNN top-1 at random init: ([\d.]+)%",
    "after": r"kNN top-1 after pretraining: ([\d.]+)%",
    "after5": r"kNN top-1 after pretraining: [\d.]+% \(top-5 ([\d.]+)%\)",
    "top1": r"^[\w+-]+(?: \([^)]*\))?: top-1 ([\d.]+)%",
    "top5": r"^[\w+-]+(?: \([^)]*\))?: top-1 [\d.]+%\s+top-5 ([\d.]+)%",
    "linear": r"compare: linear top-1 ([\d.]+)%",
    "fast": r"fast-linear top-1 ([\d.]+)%",
    "unlabeled": r"unlabelled rest of the training split: ([\d.]+)%",
}
UPDATE_ONLY = ("minutes",)  # fields of a command rewritten by --update, never compared
ENVIRONMENT = ("date", "torch", "torchvision", "pillow")  # keys of the measurement itself, likewise


def update_only(key: str) -> bool:
    return key in ENVIRONMENT or key.rpartition(".")[2] in UPDATE_ONLY


class CheckError(Exception):
    """A marker that cannot be checked (unknown command or field, a command that failed)."""


@dataclass
class Check:
    path: Path
    key: str      # "ID.FIELD" or "date"
    written: str  # the value as written in the page


def visible(text: str) -> str:
    """The page without its HTML comments: what a reader sees."""
    return COMMENT.sub("", text)


def prose(text: str) -> str:
    """The page with its code blocks and code spans blanked out: markers inside them are examples."""
    blank = lambda m: " " * len(m.group(0))  # noqa: E731
    return SPAN.sub(blank, FENCE.sub(blank, text))


def parse_page(path: Path, text: str) -> tuple[dict, list]:
    """-> ({ID: command}, [Check]) of one page; a run command not shown in the visible text is an error."""
    runs, shown = {}, " ".join(visible(text).split())
    for m in RUN_MARK.finditer(prose(text)):
        cid, command = m.group(1), " ".join(m.group(2).split())
        if cid in runs and runs[cid] != command:
            raise CheckError(f"{path}: command {cid} declared twice with different commands")
        if command not in shown:
            raise CheckError(f"{path}: command {cid} ({command}) is not shown in the page's text")
        runs[cid] = command
    checks = [Check(path, m.group("key"), m.group("value")) for m in CHECK_MARK.finditer(prose(text))]
    return runs, checks


def collect(paths) -> tuple[dict, list]:
    """Commands and checks of every page; each check names a declared command and a known field."""
    runs, checks = {}, []
    for path in paths:
        page_runs, page_checks = parse_page(path, path.read_text())
        for cid, command in page_runs.items():
            if runs.get(cid, command) != command:
                raise CheckError(f"{path}: command {cid} is declared elsewhere as: {runs[cid]}")
            runs[cid] = command
        checks += page_checks
    for c in checks:
        if c.key in ENVIRONMENT:
            continue
        cid, _, field = c.key.rpartition(".")
        if cid not in runs:
            raise CheckError(f"{c.path}: check {c.key}: no command {cid!r} declared (<!-- run {cid}: ... -->)")
        if field not in FIELDS and field not in UPDATE_ONLY:
            raise CheckError(f"{c.path}: check {c.key}: unknown field {field!r}; known: "
                             f"{', '.join([*FIELDS, *UPDATE_ONLY])}")
    return runs, checks


def read_fields(output: str) -> dict:
    """{FIELD: printed value} of one command's output (the last match of each field)."""
    found = {}
    for field, pattern in FIELDS.items():
        values = re.findall(pattern, output, re.M)
        if values:
            found[field] = values[-1]
    return found


def compare(checks, measured: dict, tolerance: float = 0.0) -> list:
    """[(check, measured value)] of every compared check whose written value differs from the measured one."""
    wrong = []
    for c in checks:
        if update_only(c.key):
            continue
        if c.key not in measured:
            raise CheckError(f"{c.path}: check {c.key}: the command did not print that field")
        if abs(float(c.written) - float(measured[c.key])) > tolerance:
            wrong.append((c, measured[c.key]))
    return wrong


def rewrite(text: str, measured: dict, keys=None) -> str:
    """The page with each checked value replaced by its measured one (only ``keys``, when given); markers in
    code blocks and code spans are left as they are."""
    out, end = [], 0
    for m in CHECK_MARK.finditer(prose(text)):  # prose() keeps every position
        key = m.group("key")
        if key not in measured or (keys is not None and key not in keys):
            continue
        out += [text[end:m.start("value")], measured[key]]
        end = m.end("value")
    return "".join(out + [text[end:]])


def diff(path: Path, old: str, new: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{path} (written)",
                                        f"{path} (measured)"))


def make_recipe(target: str, makefile: Path) -> str:
    """The one-line recipe of ``make TARGET``, with ``$(BIN)/`` dropped (the programs come from PATH)."""
    text = makefile.read_text() if makefile.is_file() else ""
    m = re.search(rf"^{re.escape(target)}:[^\n]*\n\t([^\n]+)\n", text, re.M)
    if not m:
        raise CheckError(f"make {target}: no one-line recipe in {makefile}")
    recipe = m.group(1).replace("$(BIN)/", "")
    if "$(" in recipe or "\\" in recipe:
        raise CheckError(f"make {target}: its recipe is not a plain command: {recipe}")
    return recipe


def argv_of(command: str, variables: dict, makefile: Path) -> list:
    """The argument list of a declared command: `make X` -> its recipe, $VARS replaced, no shell."""
    words = shlex.split(command, comments=True)
    if len(words) == 2 and words[0] == "make":
        words = shlex.split(make_recipe(words[1], makefile))
    out = []
    for w in words:
        for name in re.findall(r"\$(\w+)", w):
            if name not in variables:
                raise CheckError(f"{command}: ${name} is not set (known here: {', '.join(variables) or 'none'})")
            w = w.replace(f"${name}", variables[name])
        out.append(w)
    return out


def learn_variables(cid: str, output: str, variables: dict) -> None:
    """After command ID: $ENC from a printed run folder that holds checkpoints, $HEAD_<ID> from its printed
    linear head, $RUN_<ID> its printed run folder."""
    runs = re.findall(r"^run folder: (\S+)", output, re.M)
    for run in runs:
        ckpts = sorted(Path(run).glob("checkpoints/checkpoint-*.pt"))
        if ckpts:
            variables["ENC"] = str(ckpts[-1])
    if runs:
        variables[f"RUN_{cid}"] = runs[-1]
    heads = re.findall(r"^linear head: (\S+)", output, re.M)
    if heads:
        variables[f"HEAD_{cid}"] = heads[-1]


LAUNCHERS = ("torchrun", "srun", "$")
OPERATORS = ("|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1", "2>")


def shown_commands(text: str) -> list:
    """Every `simclr ...` / `python train.py ...` command a page shows: the lines of its fenced code blocks
    (not python ones; `\\` continuations joined) and its inline code spans that hold an option."""
    found = []
    for lang, body in FENCE.findall(text):
        if lang in ("python", "py", "yaml", "json", "bibtex"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            found.append(line.strip())
    # a code span with no option in it names a command (`simclr knn`) rather than showing an invocation
    found += [s for s in SPAN.findall(COMMENT.sub("", FENCE.sub("", text))) if " --" in s]
    return [c for c in found if entry_args(c) is not None]


def entry_args(command: str):
    """("simclr" | "train.py", the arguments after it) of a command line, or None when it runs neither.
    The program must come first, after environment assignments and a launcher (torchrun, srun)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    if len(words) == 2 and words[0] == "make":
        try:
            return entry_args(make_recipe(words[1], ROOT / "Makefile"))
        except CheckError:
            return None
    for i, w in enumerate(words):
        if w in OPERATORS or w.endswith(";"):  # the first command of a pipeline or a list
            words = words[:i] + ([w[:-1]] if w.endswith(";") and w != ";" else [])
            break
    if not words or not (words[0] in LAUNCHERS or "=" in words[0] or _program(words[0]) in
                         ("simclr", "python", "python3", "train.py")):
        return None
    for i, w in enumerate(words):
        if _program(w) == "simclr":
            return "simclr", words[i + 1:]
        if w == "-m" and i + 1 < len(words) and words[i + 1] == "simclr":
            return "simclr", words[i + 2:]
        if w.endswith("train.py"):
            return "train.py", words[i + 1:]
    return None


def _program(word: str) -> str:
    """`simclr`, `.venv/bin/simclr` -> "simclr"; a path that is not a program's (`~/.cache/simclr`) -> ""."""
    if word.startswith("-") or word.endswith("/"):
        return ""
    if "/" in word and not word.endswith(("bin/" + Path(word).name, "train.py")):
        return ""
    return Path(word).name


class _Parsed(Exception):
    """Raised in place of running a command whose options were parsed and validated."""


def option_errors(command: str) -> str:
    """'' when the command's options are known to its sub-command and its values pass validation, else the
    `error:` the CLI prints. Parses in this process through the CLI's own parser; nothing is run."""
    import contextlib
    import io

    from simclr import cli
    from simclr import config as config_lib
    kind, args = entry_args(command)
    real_build = config_lib.build

    def build_then_stop(cls, values, *a, **kw):
        real_build(cls, values, *a, **kw)
        raise _Parsed

    err, out = io.StringIO(), io.StringIO()
    config_lib.build = build_then_stop
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli.spec_main(args) if kind == "train.py" else cli.main(args)
    except _Parsed:
        return ""
    finally:
        config_lib.build = real_build
    if code == 0 and any(a in ("-h", "--help", "--version", "-V") for a in args) or not args:
        return ""
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")]
    return lines[0] if lines else f"exit code {code} without reaching the option parser"


def environment(logs: str) -> dict:
    env = dict(os.environ, SIMCLR_LOGS=logs, PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if "DATA_ROOT" not in env:  # the Makefile's rule: ../shared/data when it exists, else ./data
        shared = ROOT.parent / "shared" / "data"
        env["DATA_ROOT"] = str(shared if shared.is_dir() else ROOT / "data")
    return env


def executable(word: str) -> str:
    """`simclr`/`python` -> this interpreter's (the venv's), so the check never runs another installation."""
    if word in ("python", "python3"):
        return sys.executable
    found = shutil.which(word, path=str(Path(sys.executable).parent))
    return found or word


def run_all(runs: dict, makefile: Path, keep: bool = False) -> dict:
    """Run every declared command in order; -> {"ID.FIELD": value} of what they printed (plus ID.minutes)."""
    measured, variables = {}, {}
    logs = tempfile.mkdtemp(prefix="readme-check-")
    env = environment(logs)
    try:
        for cid, command in runs.items():
            argv = argv_of(command, variables, makefile)
            argv[0] = executable(argv[0])
            print(f"\n$ {command}    [{cid}]", file=sys.stderr, flush=True)
            start = time.time()
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            lines = []
            for line in proc.stdout:
                sys.stderr.write(line)
                lines.append(line)
            if proc.wait():
                raise CheckError(f"command {cid} exited with code {proc.returncode}: {command}")
            output = "".join(lines)
            measured.update({f"{cid}.{k}": v for k, v in read_fields(output).items()})
            measured[f"{cid}.minutes"] = f"{(time.time() - start) / 60:.1f}"
            learn_variables(cid, output, variables)
    finally:
        if keep:
            print(f"runs kept in {logs}", file=sys.stderr)
        else:
            shutil.rmtree(logs, ignore_errors=True)
    measured.update(versions())
    return measured


HEADER = re.compile(r"^\$ (.+?)    \[([\w-]+)\]$", re.M)


def replay(log: str, runs: dict) -> dict:
    """The measurement of an earlier run from what it printed (its stderr, saved): each command's section
    starts with the `$ COMMAND    [ID]` line run_all prints. Only commands still declared as they ran count."""
    measured, parts = {}, HEADER.split(log)
    for command, cid, output in zip(parts[1::3], parts[2::3], parts[3::3]):
        if runs.get(cid) == command:
            measured.update({f"{cid}.{k}": v for k, v in read_fields(output).items()})
    return {**measured, **versions()}


def versions() -> dict:
    """The measurement's date (UTC) and the versions of the libraries the numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
    for name in ("torch", "torchvision", "pillow"):
        try:
            out[name] = version(name).split("+")[0]
        except PackageNotFoundError:
            pass
    return out


def pages(root: Path = ROOT) -> list:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--update", action="store_true", help="rewrite the numbers with the measured ones")
    ap.add_argument("--list", action="store_true", help="print the commands and checks, run nothing")
    ap.add_argument("--tolerance", type=float, default=0.0, help="allowed difference in points (default 0)")
    ap.add_argument("--keep", action="store_true", help="keep the runs' temporary folder")
    ap.add_argument("--replay", metavar="LOG", help="take the numbers from the saved output (stderr) of an earlier "
                    "run of this script instead of running the commands")
    args = ap.parse_args(argv)
    try:
        files = [p for p in pages() if p.is_file()]
        runs, checks = collect(files)
        bad = [f"command {cid}: {e}" for cid, c in runs.items() if entry_args(c) and (e := option_errors(c))]
        if bad:
            raise CheckError("; ".join(bad))
        if args.list:
            for cid, command in runs.items():
                keys = [c.key for c in checks if c.key.rpartition(".")[0] == cid]
                print(f"{cid}: {command}\n    checks: {', '.join(keys) or '-'}")
            return 0
        if args.replay:
            measured = replay(Path(args.replay).read_text(), runs)
        else:
            measured = run_all(runs, ROOT / "Makefile", keep=args.keep)
        wrong = compare(checks, measured, args.tolerance)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    compared = {c.key for c in checks if not update_only(c.key)}
    for path in files:
        text = path.read_text()
        if args.update:
            new = rewrite(text, measured)
            if new != text:
                path.write_text(new)
                print(f"updated {path.relative_to(ROOT)}", file=sys.stderr)
        elif wrong:
            print(diff(path.relative_to(ROOT), text, rewrite(text, measured, compared)), end="")
    if wrong and not args.update:
        print(f"\n{len(wrong)} of {len(compared)} numbers differ from what the commands print now "
              f"(rewrite them: make readme-update)", file=sys.stderr)
        return 1
    print(f"\n{len(compared)} numbers checked{': all as written' if not wrong else ', rewritten'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
