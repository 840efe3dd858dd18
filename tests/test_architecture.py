"""The architecture contract (import-linter, pyproject.toml) holds on the tree, and it can fail: a core module that
imports a plugin family, or one model family importing another, breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lint(tree: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail("lint-imports is not installed (pip install -e '.[test]' installs import-linter)")
    return subprocess.run([str(exe), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tree,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin"})


def copy_of_the_package(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "fluxframe", tree / "fluxframe", ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def test_the_contract_holds():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "broken" not in done.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize("module,line,words", [
    ("core/pipeline.py", "import fluxframe.safety.ip", "fluxframe.core is not allowed to import fluxframe.safety"),
    ("core/config.py", "from fluxframe.provenance import watermark", "fluxframe.core is not allowed to import"),
    ("errors.py", "import fluxframe.core.plugins", "fluxframe.errors is not allowed to import fluxframe.core"),
    ("conditioning/control.py", "import fluxframe.plugins.flex2", "fluxframe.conditioning is not allowed to import"),
    ("plugins/flex2/keymap.py", "import fluxframe.plugins.flux2.keymap",
     "fluxframe.plugins.flex2 is not allowed to import fluxframe.plugins.flux2"),
])
def test_the_contract_fails_on_a_forbidden_import(tmp_path, module, line, words):
    tree = copy_of_the_package(tmp_path)
    target = tree / "fluxframe" / module
    target.write_text(target.read_text() + f"\n{line}  # a forbidden import\n")
    done = lint(tree)
    assert done.returncode != 0 and words in done.stdout, done.stdout + done.stderr
