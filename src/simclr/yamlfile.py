"""Reading a YAML config file safely: a size limit, an alias limit (a "billion laughs" bomb is refused before
it expands), and a key written twice refused instead of the second silently winning. PyYAML's SafeLoader does
the parsing; these are the guards it lacks."""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key written twice (the second would silently win)."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            dup = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: the mapping constructor reports it
            continue
        if dup:
            raise ConfigError(f"key {repr(key)[:60]} is written twice (line {key_node.start_mark.line + 1}); "
                              f"keep one")
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; larger is a mistake
MAX_ALIASES = 100  # a real config has none; the 'billion laughs' bomb needs many


def check_yaml_limits(text: str, path: str, max_aliases: int = 100) -> None:
    """Refuse YAML text with more than ``max_aliases`` aliases before anything expands them (a 'billion laughs'
    bomb); the one check for --config files and the config.yaml of every run folder."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; is it a config?")
    if text.count("*") > max_aliases and sum(1 for t in yaml.scan(text) if isinstance(t, yaml.AliasToken)) \
            > max_aliases:
        raise ConfigError(f"config file {path} uses more than {max_aliases} YAML aliases (*name); "
                          f"write the values out")


def load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; is it a config?")
        text = p.read_text()
        check_yaml_limits(text, path)
        values = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}" if "config file" not in str(e) else str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, got {type(values).__name__}")
    return values
