"""Every package folder is listed in pyproject.toml: an editable install finds an unlisted
subpackage through its parent, a wheel (pip install .) silently leaves it out."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(cfg["packages"]), cfg["package-dir"]
    found = set()
    for top in ("pipeline", "trainer", "manifests"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            found.add("dynavit." + ".".join(rel.parts))
    assert found == listed, (found - listed, listed - found)
    for name in listed:
        assert (ROOT / dirs[name] / "__init__.py").is_file(), name
