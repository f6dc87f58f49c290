"""Progress and the terminal, one rule for every command.

On a terminal: a tqdm bar, with messages written above it. Anywhere else (a pipe, a redirected log,
SLURM): no carriage returns, only timestamped lines — a message as it comes, and for a bar a line with
``done/total``, elapsed time and ETA at most every :data:`EVERY` seconds of silence (and one at the end).

Messages are ``logging`` records of the ``simclr`` logger (:mod:`simclr.messages`); :data:`TERMINAL` is the handler
that writes them here. A phase that can take more than a few seconds says what it is about to do first, shown even
without ``--verbose``: ``log.info(msg, extra=ALWAYS)``.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional, TextIO

EVERY = 30.0  # seconds without a line, off a terminal, before a bar reports where it is
_last_line = [0.0]  # when the last line went out (a bar stays quiet while messages keep coming)
ALWAYS = {"always": True}  # ``extra=`` of a note the terminal shows even without --verbose


def on_terminal(file: Optional[TextIO] = None) -> bool:
    f = file or sys.stderr
    try:
        return f.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


# Control characters a file, folder or class name (or an environment variable) can carry into a message: an
# escape sequence would recolour, move or clear the user's terminal, a carriage return hide the line it is in
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)] if chr(c) not in "\n\t"}


def printable(text: str) -> str:
    """``text`` safe to print: control characters shown as ``\\xNN``; line breaks and tabs kept."""
    return str(text).translate(_CONTROL)


def line(msg: str, file: Optional[TextIO] = None) -> None:
    """One line on the terminal: above the bars on a terminal, else timestamped."""
    f = file or sys.stderr  # looked up now: a test, or a caller, may have replaced sys.stderr
    msg = printable(msg)
    if on_terminal(f):
        from tqdm import tqdm
        tqdm.write(msg, file=f)
    else:
        print(f"{stamp()} {msg}", file=f, flush=True)
    _last_line[0] = time.monotonic()


class Terminal(logging.Handler):
    """The terminal's handler of the ``simclr`` logger: warnings always; notes with ``verbose`` (``--verbose``, on
    by default) or when marked :data:`ALWAYS`; nothing while ``muted`` (a process other than the main one)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.verbose, self.muted = True, False

    def emit(self, record: logging.LogRecord) -> None:
        if self.muted or (record.levelno < logging.WARNING and not self.verbose
                          and not getattr(record, "always", False)):
            return
        line(record.getMessage())


TERMINAL = Terminal()


def rate(per_second: float) -> str:
    """A throughput as people read it: 1234, 56.7, 0.42 (never '0' for a slow CPU run)."""
    v = float(per_second)
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def hms(seconds: float) -> str:
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


class Progress:
    """``with Progress(total, "linear head") as bar: ... bar.update()``: a tqdm bar on a terminal, timestamped
    lines otherwise, nothing with ``enabled=False``. ``initial``: steps already done (a resumed run)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0, leave: bool = True,
                 file: Optional[TextIO] = None, every: Optional[float] = None):
        self.total, self.desc, self.enabled = int(total), desc, enabled
        self.every = EVERY if every is None else every
        self.file = file or sys.stderr
        self.n = self._shown = self._start = int(initial)
        self.postfix = ""
        self.t0 = time.monotonic()
        self.bar = None
        if enabled and on_terminal(self.file):
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=self.file,
                            mininterval=1.0, leave=leave)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._updated = time.monotonic()
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - max(_last_line[0], self.t0) >= self.every:
            self._line()

    @property
    def is_bar(self) -> bool:
        """A live bar on a terminal (rather than timestamped lines)."""
        return self.bar is not None

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def _line(self) -> None:
        elapsed = time.monotonic() - self.t0
        done = self.n - self._start
        eta = elapsed / done * (self.total - self.n) if done > 0 else 0.0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        line(f"{self.desc}: {self.n}/{self.total}{pct} elapsed {hms(elapsed)} eta {hms(eta)}"
            + (f" {self.postfix}" if self.postfix else ""), self.file)
        self._shown = self.n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif (self.enabled and self.n != self._shown and time.monotonic() - self.t0 >= 1.0
              and _last_line[0] < getattr(self, "_updated", self.t0)):
            self._line()  # off a terminal: where it ended, unless that was just said (a message came after the
            # last update, as pretraining's step line) or it took no time
        self.enabled = False
