"""The docs hold the code's word, in datasette's manner: every hook and every public interface method appears in
docs/plugins.md with its exact signature, every hook has a test that names it, and the site builds strictly."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from abc import ABC
from pathlib import Path

import pytest

from fluxframe.core import hookspecs, interfaces

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
#: The interfaces a plugin implements: the ABCs and protocols fluxframe.core.interfaces defines.
INTERFACES = sorted(name for name, obj in vars(interfaces).items()
                    if inspect.isclass(obj) and obj.__module__ == interfaces.__name__
                    and (ABC in obj.__bases__ or getattr(obj, "_is_protocol", False)))


def hooks() -> list[str]:
    return sorted(name for name, obj in vars(hookspecs).items()
                  if callable(obj) and hasattr(obj, "fluxframe_spec"))


def signature_text(name: str, fn) -> str:
    """``name(a: T, b: U = 1, *, c: V) -> R`` as written in the source (self and cls left out)."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    parts, starred = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not starred:
            parts.append("*")
            starred = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        starred |= p.kind is p.VAR_POSITIONAL
        if p.annotation is not p.empty:
            text += f": {p.annotation}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
        parts.append(text)
    ret = f" -> {sig.return_annotation}" if sig.return_annotation is not sig.empty else ""
    return f"{name}({', '.join(parts)}){ret}"


def interface_members() -> list[str]:
    """Every public method and property an interface declares, as ``Class.member(...)`` / ``Class.member -> T``."""
    out = []
    for cls_name in INTERFACES:
        cls = getattr(interfaces, cls_name)
        for name, member in vars(cls).items():
            if name.startswith("_"):
                continue
            if isinstance(member, property):
                ret = inspect.signature(member.fget).return_annotation
                out.append(f"{cls_name}.{name} -> {ret}")
            elif isinstance(member, (classmethod, staticmethod)) or inspect.isfunction(member):
                out.append(signature_text(f"{cls_name}.{name}", getattr(cls, name)))
    return out


def test_there_are_hooks_and_interfaces_to_document():
    assert "register_filters" in hooks() and len(hooks()) >= 7
    assert {"ModelFamily", "Conditioner", "Sampler", "Postprocessor", "Filter", "MemoryStrategy"} <= set(INTERFACES)
    assert "ModelFamily.load(config: Config, memory: MemoryStrategy) -> ModelFamily" in interface_members()


@pytest.mark.parametrize("hook", hooks())
def test_every_hook_is_documented_with_its_signature(hook):
    assert f"`{signature_text(hook, getattr(hookspecs, hook))}`" in PLUGINS_DOC.read_text(), \
        f"hook {hook} is not documented in docs/plugins.md with its exact signature"


@pytest.mark.parametrize("member", interface_members())
def test_every_interface_method_is_documented_with_its_signature(member):
    assert f"`{member}`" in PLUGINS_DOC.read_text(), \
        f"{member} is not in docs/plugins.md (or its documented signature differs)"


@pytest.mark.parametrize("hook", hooks())
def test_every_hook_has_a_test_that_names_it(hook):
    named = [p.name for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py" and hook in p.read_text()]
    assert named, f"no test names the hook {hook}"


def test_the_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.fail("mkdocs is not installed (pip install -e '.[test]' installs mkdocs-material)")
    done = subprocess.run([mkdocs, "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                                                                          "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "plugins" / "index.html").is_file()
