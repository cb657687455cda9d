"""Guard rails: every module imports, and dependencies point one way down the data flow
(`data/`, `tasks/` and `losses/` never import `models/`; `losses/` imports no other rlhfkit layer)."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import rlhfkit

MODULES = sorted(info.name for info in pkgutil.walk_packages(rlhfkit.__path__, "rlhfkit."))


def test_found_the_modules():
    for name in ("rlhfkit.cli", "rlhfkit.config", "rlhfkit.models.load", "rlhfkit.data.encode",
                 "rlhfkit.losses.nll", "rlhfkit.train.loop", "rlhfkit.rollout.generate"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


def _loaded_after_importing(packages: list[str]) -> list[str]:
    """rlhfkit modules in sys.modules after a fresh interpreter imports every module of `packages`."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"for pkg in {packages!r}:\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('rlhfkit') or m == 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_data_tasks_and_losses_do_not_import_models():
    loaded = _loaded_after_importing(["rlhfkit.data", "rlhfkit.tasks", "rlhfkit.losses"])
    assert "rlhfkit.data.encode" in loaded and "rlhfkit.losses.nll" in loaded  # really imported
    for forbidden in ("rlhfkit.models", "rlhfkit.train", "rlhfkit.rollout", "transformers"):
        assert not any(m == forbidden or m.startswith(forbidden + ".") for m in loaded), (forbidden, loaded)


def test_losses_import_only_torch():
    """Static check of every import statement under rlhfkit/losses: torch, the standard library,
    and other loss modules only (so losses stay pure functions of tensors)."""
    root = Path(rlhfkit.__file__).parent / "losses"
    files = sorted(root.rglob("*.py"))
    assert files
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." if node.level else node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = (name == "." or top in ("torch", "__future__") or top in sys.stdlib_module_names
                      or name.startswith(("rlhfkit.losses", "rlhfkit.errors")))
                if not ok:
                    bad.append(f"{path.name}: import {name}")
    assert not bad, bad
