"""The package's build metadata (pyproject.toml), as setuptools prepares it for a wheel."""
from __future__ import annotations

import shutil
import warnings

from tests.conftest import REPO


def test_the_build_has_no_license_deprecation(tmp_path, monkeypatch):
    from setuptools import build_meta
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "src" / "simclr", tmp_path / "src" / "simclr",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist_info = build_meta.prepare_metadata_for_build_wheel(str(tmp_path / "meta"))
    assert not [w for w in caught if "license" in str(w.message).lower()], [str(w.message)[:200] for w in caught]
    meta = (tmp_path / "meta" / dist_info / "METADATA").read_text()
    assert "License-Expression: MIT" in meta
