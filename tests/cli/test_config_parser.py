"""The config parser never shows a traceback: any keys and values, from YAML or the command line,
give either a valid config or one ConfigError (checked with hypothesis), and valid configs survive
a round trip through their saved YAML unchanged."""
from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simclr import cli
from simclr import config as config_lib
from simclr import options
from simclr.eval_options import EvalConfig
from simclr.options import PretrainConfig
from simclr.errors import ConfigError

CLASSES = [PretrainConfig, EvalConfig]
FIELDS = {cls: [f.name for f in dataclasses.fields(cls)] for cls in CLASSES}

scalars = (st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) | st.floats(allow_nan=True)
           | st.text(max_size=20) | st.sampled_from(["auto", "cpu", "cuda", "1e3", "-1", "true", "0.5", "nan",
                                                      "inf", "resnet18", "ResNet50", "cifar", "lars", "folder"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                            inner, max_size=3),
                      max_leaves=5)


def keys_for(cls):
    names = FIELDS[cls]
    return (st.sampled_from(names) | st.sampled_from(list(options.IGNORED_KEYS))
            | st.text(max_size=15) | st.sampled_from([n[:-1] for n in names] + [n + "s" for n in names]))


def check_valid(cfg, cls) -> None:
    """An independent re-check of what a valid config means: declared types, choices and ranges."""
    assert isinstance(cfg, cls)
    hints = {f.name: config_lib.type_of(cls, f) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        v = getattr(cfg, f.name)
        assert type(v) is hints[f.name], (f.name, v)
        if isinstance(v, float):
            assert math.isfinite(v), (f.name, v)
        if f.metadata.get("choices"):
            assert v in f.metadata["choices"], (f.name, v)
        if f.metadata.get("check"):
            assert f.metadata["check"](v), (f.name, v)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_dicts_give_a_config_or_a_config_error(cls, data):
    d = data.draw(st.dictionaries(keys_for(cls), values, max_size=6))
    try:
        cfg = config_lib.build(cls, d)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg
        return
    check_valid(cfg, cls)


@settings(max_examples=200, deadline=None)
@given(d=st.dictionaries(st.none() | st.integers() | st.floats() | st.booleans() | st.text(max_size=8),
                         values, max_size=4))
def test_any_yaml_mapping_gives_a_config_or_a_config_error(tmp_path_factory, d):
    """YAML can have non-string keys (``1: 2``, ``null: x``) and typed values (dates ...)."""
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    try:
        cfg, _ = config_lib.parse(PretrainConfig, ["--config", str(path)])
    except ConfigError:
        return
    check_valid(cfg, PretrainConfig)


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_file_contents_give_a_config_or_a_config_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_bytes(raw)
    try:
        cfg, _ = config_lib.parse(PretrainConfig, ["--config", str(path)])
    except ConfigError:
        return
    check_valid(cfg, PretrainConfig)


@settings(max_examples=300, deadline=None)
@given(argv=st.lists(st.sampled_from(["--lr", "--lr=", "--temperature", "--config", "--", "-", "--iters",
                                      "--aug", "--device", "1", "-1", "0", "nan", "x", "--1", "-1e3", "true"])
                     | st.text(max_size=10), max_size=8))
def test_random_command_lines_give_a_config_or_a_config_error(argv):
    try:
        cfg, _ = config_lib.parse(PretrainConfig, argv)
    except ConfigError:
        return
    check_valid(cfg, PretrainConfig)


def valid_value(f: dataclasses.Field, typ):
    """A strategy of values that field ``f`` must accept."""
    if f.metadata.get("choices"):
        return st.sampled_from(f.metadata["choices"])
    check = f.metadata.get("check") or (lambda v: True)
    if typ is bool:
        return st.booleans()
    if typ is int:
        return st.integers(-5, 10 ** 6).filter(check)
    if typ is float:
        return st.floats(-10.0, 1e3, allow_nan=False).filter(check)
    if f.name == "logger":  # a comma-separated list of tracker names, not free text
        return st.lists(st.sampled_from(options.LOGGERS), min_size=1, max_size=3).map(",".join) | st.just("none")
    if f.name == "loss":  # a built-in or registered loss name, not free text
        return st.sampled_from(options.LOSSES)
    return st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=10).filter(
        lambda s: s.lower() != "none")


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_valid_values_are_accepted_and_round_trip_through_yaml(tmp_path_factory, data):
    cls = PretrainConfig
    skip = {"arch", "data", "data_path"}  # cross-field rules (registry, folder needs a path) below
    # spec keys with one allowed value (momentum 0.9, model_id -1) or a 'lo,hi' format: tested in test_spec_files
    skip |= {"momentum", "model_id", "blur_sigma"}
    # written in one canonical form (width 0 -> 64, JSON re-spelled): tested in test_backbones
    skip |= {"width", "width_multiplier", "timm_kwargs"}
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    chosen = data.draw(st.lists(st.sampled_from(fields), max_size=8, unique_by=lambda f: f.name))
    d = {f.name: data.draw(valid_value(f, config_lib.type_of(cls, f))) for f in chosen}
    cfg = config_lib.build(cls, d)
    for k, v in d.items():
        assert getattr(cfg, k) == v, k
    path = tmp_path_factory.mktemp("r") / "config.yaml"
    config_lib.save(cfg, path)
    again, _ = config_lib.parse(cls, ["--config", str(path)])
    # parse fills an empty name (the file's stem) and root (the default); nothing else may change
    assert again == dataclasses.replace(cfg, name=cfg.name or "config", root=cfg.root or options.default_root())


# --------------------------------------------------------------------------------------------
# the messages users see
# --------------------------------------------------------------------------------------------
BAD_CONFIG = [  # (argv, what the one error line must say)
    (["--temprature", "0.1"], ["unknown option 'temprature' (on the command line)", "did you mean 'temperature'"]),
    (["--tempreature", "0.5"], ["unknown option 'tempreature'", "did you mean 'temperature'"]),
    (["--batchsize", "64"], ["did you mean 'batch_size'"]),
    (["--lr_shedule", "const"], ["unknown option 'lr_shedule'", "did you mean 'lr_schedule'"]),
    (["--lr", "-1"], ["option 'lr' got -1.0", "must be >= 0"]),
    (["--lr", "inf"], ["option 'lr'", "finite"]),
    (["--lr", "nan"], ["option 'lr'", "finite"]),
    (["--temperature", "0"], ["option 'temperature' got 0.0", "must be > 0"]),
    (["--temperature", "-1"], ["option 'temperature'", "must be > 0"]),
    (["--multiplier", "1"], ["option 'multiplier' got 1", "must be within [2, 64]"]),
    (["--warmup", "2"], ["option 'warmup' got 2.0", "within [0, 1]"]),
    (["--warmup", "-0.1"], ["option 'warmup' got -0.1", "[0, 1]"]),
    (["--iters", "ten"], ["option 'iters' expects an integer, got 'ten'"]),
    (["--batch_size", "big"], ["option 'batch_size' expects an integer, got 'big'"]),
    (["--aug", "maybe"], ["option 'aug' expects true or false"]),
    (["--arch", "resnet51"], ["option 'arch' got 'resnet51'", "did you mean"]),
    (["--opt", "lasr"], ["did you mean 'lars'?"]),
    (["--opt", "adamw"], ["option 'opt' got 'adamw'", "allowed"]),
    (["--lr"], ["--lr needs a value"]),
    (["lr", "1"], ["unexpected argument 'lr'"]),
]


@pytest.mark.parametrize("argv,needles", BAD_CONFIG, ids=[" ".join(a) for a, _ in BAD_CONFIG])
def test_bad_config_is_one_error_line_naming_the_key_and_the_fix(tmp_path, capsys, argv, needles):
    """Through the command's entry point: exit code 2, one `error:` line, no traceback, nothing written."""
    rc = cli.main(["pretrain", "--root", str(tmp_path / "logs"), "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not (tmp_path / "logs").exists()


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config_lib.parse(PretrainConfig, ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_lib.parse(PretrainConfig, ["--config", str(bad)])
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config_lib.parse(PretrainConfig, ["--config", str(bad)])
    bad.write_text("lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown option 'lrr' \(in .*bad.yaml\); did you mean 'lr'"):
        config_lib.parse(PretrainConfig, ["--config", str(bad)])


def test_command_line_overrides_yaml_and_spec_keys_are_ignored_with_a_note(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.3\ntemperature: 0.2\nid: 7\nstatus: done\n")
    cfg, notes = config_lib.parse(PretrainConfig, ["--config", str(f), "--lr", "0.6"])
    assert (cfg.lr, cfg.temperature, cfg.name) == (0.6, 0.2, "c")
    assert len(notes) == 1 and "id" in notes[0] and "status" in notes[0]
