"""The one configuration mechanism of every ``simclr`` command: a typed schema, YAML, then the command line.

A schema is a dataclass whose fields are made with :func:`option` (default, help text, allowed values,
range check, key aliases, positional). :func:`parse` reads ``--config FILE.yaml`` first, then the
command line on top; every command therefore shares one syntax:

* ``--key value`` and ``--key=value``; ``-j 4`` where a field declares a short alias;
* booleans: ``--flag``, ``--flag true`` and ``--flag false`` (also yes/no/on/off/1/0);
* list fields: repeat the option (``--where a=1 --where b=2``); positional fields take bare words;
* ``-h``/``--help`` raises :class:`ShowHelp` with the text :func:`help_text` makes from the schema.

Anything unknown, mistyped or out of range is one :class:`ConfigError` line naming the key, where it came
from (the file or the command line) and the nearest valid name. Why not argparse: YAML and the command line
must share one set of types, checks and messages, and the spec's files carry keys argparse cannot express
(``-1`` sentinels, keys ignored with a note); one small parser keeps all of that in one place.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
import unicodedata
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from .errors import ConfigError
from .files import atomic_write
from .yamlfile import load_yaml  # noqa: F401  (config_lib.load_yaml: the spec entry point reads `problem`)

COMMAND_LINE = "on the command line"
MAX_SHOWN = 60  # characters of a bad value quoted in an error message (a YAML alias bomb stays short)
TRUE = ("1", "true", "yes", "y", "on")
FALSE = ("0", "false", "no", "n", "off")
INT_MIN, INT_MAX = -2 ** 63, 2 ** 63 - 1  # every integer option fits an int64 (torch, numpy, JSON readers)
FLOAT_MAX = 1e12  # every float option is finite and this small: products of two stay finite in float32
SEED_MAX = 2 ** 32 - 1  # numpy's seeds; -1 (draw one) where an option says so


class ShowHelp(Exception):
    """``-h``/``--help`` was given: the entry point prints ``str(self)`` and exits 0."""


# What an option is to a run besides its value, declared on the option and read with :func:`with_role`:
ROLES = {
    "trajectory": "changes where a run goes (pretraining's weights, the head an evaluation trains): a resume that "
                  "changes it is refused (pretraining: unless allowed); every pretraining and eval option says True "
                  "or False",
    "shapes": "the weights' shapes depend on it: a checkpoint resumes only with its own value",
    "per_process": "each process may hold its own value (where it runs, what it prints or writes)",
    "optimizer": "another value makes another optimizer, whose state cannot be carried over",
    "knn": "`simclr knn` takes it (of the eval options, those the kNN protocol reads)",
    "bookkeeping": "where or how a run ran, not what it learned: `simclr compare` lists it apart from the differences",
}


def option(default=None, help: str = "", choices: Sequence | None = None, check: Callable[[Any], bool] | None = None,
           check_msg: str = "", *, aliases: Sequence[str] = (), positional: bool = False,
           convert: Callable[[Any], Any] | None = None, default_factory=None, switch: bool = False,
           trajectory: bool | None = None, shapes: bool = False, per_process: bool = False, optimizer: bool = False,
           knn: bool = False, bookkeeping: bool = False):
    """A schema field.

    ``aliases``: other accepted key names (``"wd"``; a one-letter alias is also a short flag ``-j``).
    ``positional``: filled from bare command-line words (a ``list`` field takes all of them).
    ``switch``: a text option that, like a boolean, may stand alone on the command line (``--flag`` = true).
    ``convert``: maps an accepted spelling to the canonical value before type checking (``cifar`` -> ``cifar10``);
    it sees YAML mappings and lists too (returned unchanged, or bounded work: a YAML alias bomb is huge).
    ``trajectory``, ``shapes``, ``per_process``, ``optimizer``, ``knn``, ``bookkeeping``: its roles (:data:`ROLES`);
    ``trajectory`` None means not declared (only options no pretraining reads).
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "check": check, "check_msg": check_msg,
            "aliases": tuple(aliases), "positional": positional, "convert": convert, "switch": switch,
            "trajectory": trajectory, "shapes": shapes, "per_process": per_process, "optimizer": optimizer,
            "knn": knn, "bookkeeping": bookkeeping}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


AUTO_SWITCH = ("auto", "true", "false")


def _auto_switch(value):
    """true/false in any spelling a boolean accepts (YAML booleans too) -> 'true'/'false'; 'auto' stays."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower() if isinstance(value, (str, int)) else value
    return "true" if text in TRUE else "false" if text in FALSE else text


def auto_switch(default: str = "auto", help: str = "", **roles):
    """A switch whose default depends on the device: ``auto`` (not given), ``true`` or ``false``. On the command
    line ``--flag`` alone means true, as for a boolean; read it with :func:`switch_on`."""
    return option(default, help, AUTO_SWITCH, convert=_auto_switch, switch=True, **roles)


def switch_on(value: str, auto: bool) -> bool:
    """An :func:`auto_switch` value: ``auto`` -> ``auto`` (the device's default), else what was given."""
    return auto if value == "auto" else value == "true"


def seed_range(draw: bool) -> dict:
    """The range check of a seed option: 0..2**32-1, and -1 (draw one) where ``draw``."""
    lo = -1 if draw else 0
    return dict(check=lambda x: lo <= x <= SEED_MAX, check_msg=f"a seed must be within [{lo}, {SEED_MAX}]")


def finite_numbers(key: str, text: str) -> list:
    """'0.1,2.0' (also spaces, brackets) -> [0.1, 2.0]: a text option holding numbers, each finite like every
    float option."""
    parts = [p for p in str(text).strip("()[] ").replace(",", " ").split() if p]
    try:
        out = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"option '{key}' expects comma-separated numbers, got {shown(text)}") from None
    if any(not math.isfinite(x) or abs(x) > FLOAT_MAX for x in out):
        raise ConfigError(f"option '{key}' expects finite numbers within ±{FLOAT_MAX:g}, got {shown(text)}")
    return out


def _text(key: str, value: Any) -> str:
    """A text value: control characters (NUL, escape, newline) are refused, never written to a name or path."""
    text = str(value)
    bad = next((c for c in text if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise ConfigError(f"option '{key}' contains the control character {bad!r}; give printable text only")
    return text


def positive(x) -> bool:
    return x > 0


def nonneg(x) -> bool:
    return x >= 0


def shown(value: Any) -> str:
    """A value as quoted in an error message: repr, on one line, at most MAX_SHOWN characters. A container is
    only named (never repr'd whole: a YAML alias bomb expands to billions of elements)."""
    if isinstance(value, (dict, list)):
        return f"<{type(value).__name__} of {len(value)} item(s)>"
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "...'"


def fields(cls) -> list:
    return list(dataclasses.fields(cls))


def with_role(cls, role: str) -> tuple:
    """The names of the options of schema ``cls`` that declare ``role`` (one of :data:`ROLES`), in schema order."""
    if role not in ROLES:
        raise KeyError(f"unknown option role {role!r}; roles: {', '.join(ROLES)}")
    return tuple(f.name for f in fields(cls) if f.metadata.get(role))


def type_of(cls, f: dataclasses.Field):
    hint = typing.get_type_hints(cls)[f.name]
    return list if typing.get_origin(hint) is list else hint


def _key_table(cls) -> dict:
    """Every accepted key name (and alias) -> field name."""
    return {k: f.name for f in fields(cls) for k in (f.name, *f.metadata.get("aliases", ()))}


def parse_bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    s = str(v).strip().lower()
    if s in TRUE:
        return True
    if s in FALSE:
        return False
    raise ConfigError(f"option '{key}' expects true or false, got {shown(v)}")


def coerce(key: str, typ, value: Any):
    """Convert a YAML or command-line value to the field's type, with a clear error."""
    if typ is bool:
        return parse_bool(key, value)
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"option '{key}' expects an integer, got {shown(value)}")
        out = _integer(key, value)
        if not INT_MIN <= out <= INT_MAX:
            raise ConfigError(f"option '{key}' expects an integer within ±2**63, got {shown(value)}")
        return out
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"option '{key}' expects a number, got {shown(value)}")
        try:
            out = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"option '{key}' expects a number, got {shown(value)}") from None
        if not math.isfinite(out) or abs(out) > FLOAT_MAX:
            raise ConfigError(f"option '{key}' expects a finite number within ±{FLOAT_MAX:g}, got {shown(value)}")
        return out
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"option '{key}' expects a string, got {shown(value)}")
        return _text(key, value)
    if typ is list:
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, (dict, list)) for v in items):
            raise ConfigError(f"option '{key}' expects a list of strings, got {shown(value)}")
        return ["" if v is None else _text(key, v) for v in items]
    raise ConfigError(f"option '{key}' has an unsupported type {typ}")  # pragma: no cover


def _integer(key: str, value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        try:  # 1e3 style integers
            fv = float(str(value))
            if fv.is_integer():
                return int(fv)
        except (ValueError, OverflowError):
            pass
        raise ConfigError(f"option '{key}' expects an integer, got {shown(value)}") from None


def suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _where(source: str) -> str:
    if not source:
        return ""
    return f" ({source})" if source == COMMAND_LINE else f" (in {source})"


def _command(cls) -> str:
    return getattr(cls, "COMMAND", "")


def build(cls, values: dict, source: str = "", sources: Optional[dict] = None) -> Any:
    """Create a validated config of schema ``cls`` from a plain dict. ``sources`` maps a key to where it came
    from (a file name or the command line) for error messages; ``source`` is the default."""
    sources = sources or {}
    table = _key_table(cls)
    by_name = {f.name: f for f in fields(cls)}
    ignored = getattr(cls, "IGNORED_KEYS", ())
    kwargs = {}
    for key, value in values.items():
        where = _where(sources.get(key, source))
        if not isinstance(key, str):  # YAML allows `1: x` or `null: x`
            raise ConfigError(f"option names are text, got {shown(key)}{where}")
        if key in ignored:
            continue
        if key not in table:
            name = key if key.isprintable() else repr(key)[1:-1]  # the message stays on one line
            help_hint = f" See `simclr {_command(cls)} --help`." if _command(cls) else ""
            other, other_cls = getattr(cls, "OTHER", ("", None))  # a key of a sibling command (knn vs eval)
            if other_cls is not None and key in _key_table(other_cls):
                raise ConfigError(f"option '{key}'{where} belongs to `simclr {other}`; `simclr {_command(cls)}` "
                                  f"does not use it.{help_hint}")
            raise ConfigError(f"unknown option '{shown(name)[1:-1]}'{where}{suggest(key, list(by_name))}{help_hint}")
        f = by_name[table[key]]
        convert = f.metadata.get("convert")
        try:
            value = convert(value) if convert else value
            kwargs[f.name] = coerce(f.name, type_of(cls, f), value)
        except ConfigError as e:
            raise ConfigError(f"{e}{where}") from None
    cfg = cls(**kwargs)
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    """Choices and range checks of every field, then the schema's own cross-field ``check()`` if it has one."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        choices = f.metadata.get("choices")
        if choices and v not in choices:
            close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"option '{f.name}' got {shown(v)}; allowed: {', '.join(map(str, choices))}{hint}")
        check = f.metadata.get("check")
        if check is not None and not check(v):
            raise ConfigError(f"option '{f.name}' got {shown(v)}: {f.metadata.get('check_msg') or 'out of range'}")
    if hasattr(cfg, "check"):
        cfg.check()


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def split_argv(argv: Sequence[str], cls=None) -> tuple[Optional[str], dict, list]:
    """``['--config', 'a.yaml', '--lr', '1', '--aug', 'x']`` -> ('a.yaml', {'lr': '1', ...}, [bare words]).

    With a schema, a boolean option may stand alone (``--aug``), a one-letter alias is a short flag (``-j 4``),
    list options collect repeated values, and ``-h``/``--help`` raise :class:`ShowHelp`.
    """
    table = _key_table(cls) if cls is not None else {}
    types = {f.name: type_of(cls, f) for f in fields(cls)} if cls is not None else {}
    switches = {f.name for f in fields(cls) if f.metadata.get("switch")} if cls is not None else set()
    config_path, overrides, words = None, {}, []
    argv = list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            raise ShowHelp(help_text(cls) if cls is not None else "")
        short = len(a) == 2 and a[0] == "-" and a[1].isalpha()
        if not a.startswith("--") and not short:
            if cls is not None and any(f.metadata.get("positional") for f in fields(cls)):
                words.append(a)
                i += 1
                continue
            raise ConfigError(f"unexpected argument {shown(a)}: options are written --key value")
        key = a[1:] if short else a[2:]
        value = None
        if "=" in key:
            key, value = key.split("=", 1)
        key = key.replace("-", "_")
        name = table.get(key, key)
        i += 1
        if value is None:
            nxt = argv[i] if i < len(argv) else None
            takes_next = nxt is not None and (not nxt.startswith("-") or _is_number(nxt))
            is_literal = takes_next and nxt.strip().lower() in TRUE + FALSE + (("auto",) if name in switches else ())
            has_words = any(f.metadata.get("positional") for f in fields(cls)) if cls is not None else False
            if (types.get(name) is bool or name in switches) and not is_literal and (not takes_next or has_words):
                value = "true"  # a bare switch (a word after it is a positional argument, or a bad value)
            elif not takes_next:
                raise ConfigError(f"option {a} needs a value (write {a} VALUE)")
            else:
                value, i = nxt, i + 1
        if key == "config":
            config_path = value
        elif types.get(name) is list:
            overrides.setdefault(key, []).append(value)
        else:
            overrides[key] = value
    return config_path, overrides, words


def parse(cls, argv: Sequence[str], extra: dict | None = None):
    """YAML (``--config``) then ``extra`` then command-line overrides, validated into schema ``cls``.

    Returns (config, notes): notes are messages for the user (keys ignored ...). A schema may define
    ``finalize(config_path)`` to fill defaults that depend on where the config came from, and
    ``notes()`` returning more notes (values accepted that have no effect).
    """
    config_path, overrides, words = split_argv(argv, cls)
    positional = [f for f in fields(cls) if f.metadata.get("positional")]
    for f in positional:
        if not words:
            break
        if type_of(cls, f) is list:
            overrides[f.name], words = words, []
        else:
            overrides[f.name] = words.pop(0)
    if words:
        raise ConfigError(f"unexpected argument {shown(words[0])}: options are written --key value")
    values: dict = {}
    sources: dict = {}
    if config_path:
        values.update(load_yaml(config_path))
        sources.update({k: config_path for k in values if isinstance(k, str)})
    values.update(extra or {})
    table = _key_table(cls)
    given = {table.get(k, k) for k in overrides}  # ALTERNATIVES: keys that set one quantity (width, multiplier) ...
    for group in [g for g in getattr(cls, "ALTERNATIVES", ()) if given & set(g)]:  # ... one given here drops the others
        values = {k: v for k, v in values.items() if table.get(k, k) not in set(group) - given}
    values.update(overrides)
    sources.update({k: COMMAND_LINE for k in overrides})
    for f in positional:
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values:
            raise ConfigError(f"missing {f.name.upper()}: {f.metadata.get('help', '')} "
                              f"(see `simclr {_command(cls)} --help`)")
    notes = []
    ignored = sorted(k for k in values if k in getattr(cls, "IGNORED_KEYS", ()))
    if ignored:
        notes.append(f"note: ignoring option(s) that only describe a past run: "
                     f"{', '.join(ignored)}")
    cfg = build(cls, values, sources=sources)
    if hasattr(cfg, "finalize"):
        cfg.finalize(config_path)
    if hasattr(cfg, "notes"):  # the schema's own notes (values accepted but without effect)
        notes += cfg.notes()
    return cfg, notes


def help_text(cls, prog: str = "") -> str:
    """The ``--help`` of a schema: its docstring, then every option with type, default, choices and help."""
    prog = prog or f"simclr {_command(cls)}"
    pos = [f for f in fields(cls) if f.metadata.get("positional")]
    usage = " ".join(f.name.upper() + ("..." if type_of(cls, f) is list else "") for f in pos)
    yaml_part = "[--config FILE.yaml] " if getattr(cls, "YAML", True) else ""
    lines = [f"usage: {prog} {usage + ' ' if usage else ''}{yaml_part}[--key value ...]", ""]
    doc = (cls.__doc__ or "").strip()
    if doc:
        lines += [doc, ""]
    lines.append("Options (booleans: --flag, --flag true or --flag false"
                 + ("; YAML keys are the same names" if getattr(cls, "YAML", True) else "") + "):")
    lines.append("")
    for f in fields(cls):
        typ = type_of(cls, f)
        tname = "BOOL" if typ is bool else typ.__name__.upper()
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        choices = f.metadata.get("choices")
        extra = f" {{{', '.join(map(str, choices))}}}" if choices else ""
        names = f.name.upper() if f.metadata.get("positional") else f"--{f.name}"
        aliases = [("-" if len(a) == 1 else "--") + a for a in f.metadata.get("aliases", ())]
        if aliases:
            names += f" ({', '.join(aliases)})"
        shown_default = "" if default is None else f"  (default: {default!r})"
        lines.append(f"  {names} {'' if f.metadata.get('positional') else tname}{extra}{shown_default}")
        lines.append(f"        {f.metadata.get('help', '')}")
    ignored = getattr(cls, "IGNORED_KEYS", ())
    if ignored:
        lines += ["", "Also accepted and ignored (they describe a past run): " + ", ".join(ignored)]
    return "\n".join(lines)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg, path: Path, **replace) -> None:
    """``cfg`` as YAML at ``path``, with the values in ``replace`` written instead of ``cfg``'s."""
    atomic_write(path, yaml.safe_dump({**to_dict(cfg), **replace}, sort_keys=True))
