"""What a hostile tester tried against a run's inputs and outputs (issue 22, classes 1, 2, 4 and 7's UTF-8 and
output-folder cases): files swapped after the filters read them, outputs aimed at the deployment's own files,
template escapes, overwrites, a release audited before its file exists, kill -9 leftovers, undecodable prompts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from flex2_helpers import build_flux_folder
from PIL import Image

from fluxframe import api, hookimpl
from fluxframe.cli import main
from fluxframe.core import output as output_module
from fluxframe.core.audit import verify_log
from fluxframe.core.interfaces import Filter, Verdict
from fluxframe.errors import AuditError, ConfigError, OutputError, RequestError

TINY = {"model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 2, "width": 64, "height": 64}}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def picture(path: Path, colour, size=(64, 64)) -> bytes:
    """A picture with some structure (a reference must change the output), saved as PNG; returns its bytes."""
    array = np.zeros((*size[::-1], 3), np.uint8)
    array[...] = colour
    array[: size[1] // 2, : size[0] // 3] = 255 - np.array(colour, np.uint8)
    Image.fromarray(array).save(path)
    return path.read_bytes()


def lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


class Swapper(Filter):
    """An input filter that, while it checks, replaces every file in ``swaps`` on disk: the race a hostile user
    wins between the filters' read and the model's, made certain."""

    name = "swapper"
    version = "1"
    swaps: dict[Path, bytes] = {}

    def __init__(self, targets=("input_image", "prompt")):
        self.targets = frozenset(targets)

    def _swap(self, target):
        for path, data in Swapper.swaps.items():
            path.write_bytes(data)
        return Verdict(filter=self.name, version=self.version, allowed=True, target=target)

    def check_prompt(self, text, target):
        return self._swap(target)

    def check_image(self, image, target):
        return self._swap(target)


class SwapperPlugin:
    @hookimpl
    def register_filters(self, register):
        register("swapper", Swapper)


@pytest.fixture
def swap_host(host):
    host.add(SwapperPlugin(), name="swapper-plugin")
    Swapper.swaps = {}
    yield host
    Swapper.swaps = {}


def config(tmp_path, **sections):
    data = {**TINY, "output": {"dir": str(tmp_path / "out")},
            "safety": {"require": ["swapper"], "audit_log": str(tmp_path / "audit.jsonl")}}
    data.update(sections)
    return api.parse_config(data, source=str(tmp_path / "deploy.toml"), base_dir=tmp_path)


# -- class 1: what the filters saw is what the model used ------------------------------------------------------

def test_a_reference_swapped_after_the_filters_read_it_is_not_used(tmp_path, swap_host):
    ref = tmp_path / "ref.png"
    harmless, other = picture(ref, (200, 30, 30)), picture(tmp_path / "other.png", (20, 90, 220))
    ref.write_bytes(harmless)
    pipeline = api.load(config(tmp_path), host=swap_host)

    def run(**kw):
        return pipeline.generate(api.GenerationRequest(prompt="a cat", seed=3, **kw,
                                                       conditioning={"reference": {"images": [ref]}}), write=False)

    plain = np.asarray(run().image)
    Swapper.swaps = {ref: other}  # the file is replaced while the filters run
    ref.write_bytes(harmless)
    swapped = run()
    assert ref.read_bytes() == other  # the swap did happen
    assert np.array_equal(np.asarray(swapped.image), plain)  # ... and changed nothing
    Swapper.swaps = {}
    assert not np.array_equal(np.asarray(run().image), plain)  # the other picture would have changed the image
    audited = [line for line in lines(tmp_path / "audit.jsonl") if line.get("event") == "request"]
    assert audited[1]["input_files"] == [{"role": "reference.images[0]", "sha256": sha(harmless),
                                          "bytes": len(harmless)}]
    assert audited[2]["input_files"][0]["sha256"] == sha(other)


@pytest.fixture(scope="module")
def flex2_folder(tmp_path_factory):
    return build_flux_folder(tmp_path_factory.mktemp("flex2"))


def test_inpaint_image_mask_and_control_swapped_after_the_filters_are_not_used(tmp_path, swap_host, flex2_folder):
    image, mask, control = tmp_path / "image.png", tmp_path / "mask.png", tmp_path / "control.png"
    originals = {image: picture(image, (120, 60, 10)), control: picture(control, (0, 0, 0))}
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (0, 0, 32, 64))
    m.save(mask)
    originals[mask] = mask.read_bytes()
    replacements = {image: picture(tmp_path / "i2.png", (10, 200, 200)), control: picture(tmp_path / "c2.png",
                                                                                          (250, 250, 250))}
    Image.new("L", (64, 64), 255).save(tmp_path / "m2.png")
    replacements[mask] = (tmp_path / "m2.png").read_bytes()
    cfg = config(tmp_path, model={"family": "flex2", "path": str(flex2_folder), "dtype": "float32", "device": "cpu"})
    pipeline = api.load(cfg, host=swap_host)
    conditioning = {"inpaint": {"image": image, "mask": mask}, "control": {"image": control}}

    def run():
        for path, data in originals.items():
            path.write_bytes(data)
        return np.asarray(pipeline.generate(api.GenerationRequest(prompt="a cat", seed=1, conditioning=conditioning),
                                            write=False).image)

    plain = run()
    for path in originals:  # one file swapped at a time: each on its own would change the image
        Swapper.swaps = {path: replacements[path]}
        assert np.array_equal(run(), plain), path.name
        assert path.read_bytes() == replacements[path]
        Swapper.swaps = {}
        path.write_bytes(replacements[path])
        changed = np.asarray(pipeline.generate(api.GenerationRequest(prompt="a cat", seed=1,
                                                                     conditioning=conditioning), write=False).image)
        assert not np.array_equal(changed, plain), path.name
    records = [line for line in lines(tmp_path / "audit.jsonl") if line.get("event") == "request"]
    roles = {f["role"]: f["sha256"] for f in records[1]["input_files"]}
    assert roles == {"inpaint.image": sha(originals[image]), "inpaint.mask": sha(originals[mask]),
                     "control.image": sha(originals[control])}


def test_prompt_embeddings_swapped_after_the_prompt_filters_are_not_used(tmp_path, swap_host, capsys):
    cfg = config(tmp_path)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    api.encode(cfg, "a red circle", first, host=swap_host)
    api.encode(cfg, "a blue square", second, host=swap_host)
    good, bad = first.read_bytes(), second.read_bytes()
    pipeline = api.load(cfg, host=swap_host)

    def run():
        return np.asarray(pipeline.generate(api.GenerationRequest(prompt_embeds=first, seed=2), write=False).image)

    plain = run()
    Swapper.swaps = {first: bad}
    swapped = run()
    assert first.read_bytes() == bad and np.array_equal(swapped, plain)
    records = [line for line in lines(tmp_path / "audit.jsonl") if line.get("event") == "request"]
    assert records[1]["prompt_embeds_sha256"] == sha(good)
    assert records[1]["prompt_sha256"] == sha(b"a red circle")  # the text the filters checked


def test_builtin_conditioners_declare_every_file_input():
    from fluxframe.conditioning.control import ControlConditioner
    from fluxframe.conditioning.inpaint import InpaintConditioner
    from fluxframe.conditioning.reference import ReferenceConditioner

    assert ReferenceConditioner.file_inputs == ("images",)
    assert set(InpaintConditioner.file_inputs) == {"image", "mask"}
    assert ControlConditioner.file_inputs == ("image",)


def test_inputs_are_read_once_whole_and_refused_clearly(tmp_path):
    from fluxframe.core.inputs import read_input

    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for path, words in ((tmp_path / "dir", "is a directory"), (tmp_path / "fifo", "not a regular file"),
                        (tmp_path / "absent.png", "no such file")):
        with pytest.raises(RequestError, match=words) as info:
            read_input(path, "conditioning.reference.images[0]")
        assert str(path) in str(info.value) and info.value.field == "conditioning.reference.images[0]"
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(RequestError, match="larger than 100 bytes"):
        read_input(tmp_path / "big", "x", max_bytes=100)


# -- class 2: outputs never destroy evidence or escape -----------------------------------------------------------

@pytest.fixture
def deployment(tmp_path):
    """A config file on disk with an audit log, a LoRA-less tiny model, fake C2PA files and a filter list."""
    (tmp_path / "names.txt").write_text("Mickey Mouse\n")
    (tmp_path / "key.pem").write_text("not a real key\n")
    text = textwrap.dedent("""
        [model]
        preset = "tiny"
        dtype = "float32"
        device = "cpu"
        [sampler]
        steps = 1
        width = 64
        height = 64
        [output]
        dir = "out"
        [safety]
        require = ["prompt-nsfw", "ip"]
        audit_log = "logs/audit.jsonl"
        [safety.filters.ip]
        names_file = "names.txt"
    """)
    (tmp_path / "deploy.toml").write_text(text)
    return tmp_path


def generate(deployment, *extra, prompt="a red circle"):
    return main(["generate", "--config", str(deployment / "deploy.toml"), "--prompt", prompt, "--seed", "1",
                 "--no-progress", *extra])


def test_an_output_naming_a_file_the_deployment_uses_is_refused_before_loading(deployment, capsys, monkeypatch):
    assert generate(deployment) == 0  # makes the audit log and its head
    capsys.readouterr()
    from fluxframe.plugins.flux2.family import Flux2

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the output was checked")

    monkeypatch.setattr(Flux2, "load", classmethod(no_load))
    log_dir = deployment / "logs"
    os.link(log_dir / "audit.jsonl", deployment / "hardlink.png")
    (deployment / "link.png").symlink_to(deployment / "names.txt")
    targets = [log_dir / "audit.jsonl", log_dir / "audit.jsonl.head", deployment / "deploy.toml",
               deployment / "names.txt", deployment / "hardlink.png", deployment / "link.png"]
    for target in targets:
        before = target.read_bytes()
        for extra in ([], ["--overwrite"]):
            assert generate(deployment, "--output", str(target), *extra) == 1, target
            err = capsys.readouterr().err
            assert "refused as an output" in err, err
            assert err.count("\n") == 1 and "Traceback" not in err
            assert target.read_bytes() == before


def test_outputs_are_refused_inside_a_checkpoint_folder_and_on_signing_files(tmp_path, monkeypatch):
    from fluxframe.core.pipeline import build_guard

    folder = tmp_path / "ckpt"
    (folder / "vae").mkdir(parents=True)
    for name in ("cert.pem", "key.pem", "lora.safetensors"):
        (tmp_path / name).write_text("x")
    cfg = api.parse_config({"model": {"path": str(folder)}, "lora": [{"path": "lora.safetensors"}],
                            "provenance": {"c2pa": {"certificate": "cert.pem", "private_key": "key.pem"}}},
                           source=str(tmp_path / "deploy.toml"), base_dir=tmp_path)
    guard = build_guard(cfg)
    for path in (folder / "new.png", folder / "vae" / "x.png", tmp_path / "cert.pem", tmp_path / "key.pem",
                 tmp_path / "lora.safetensors"):
        assert guard.problem(path) is not None, path
    assert guard.problem(tmp_path / "fine.png") is None


@pytest.mark.parametrize("template,words", [
    ("../escape", "not a path"), ("a/b", "not a path"), ("{nope}", "unknown field {nope}"),
    ("{request_id.__class__}", "unknown field"), ("{request_id[0]}", "unknown field"),
    ("{request_id!r}", "no conversion or format spec"), ("{seed:>10}", "no conversion or format spec"),
    ("{", "not a valid template"), (".hidden", "start with '.'"), ("", "empty"),
])
def test_output_name_templates_are_checked_when_the_config_loads(tmp_path, template, words):
    with pytest.raises(ConfigError) as info:
        api.parse_config({**TINY, "output": {"name": template}}, source="deploy.toml")
    assert info.value.key == "output.name" and words in str(info.value)


def test_template_fields_and_request_ids(tmp_path, host):
    cfg = api.parse_config({**TINY, "output": {"dir": str(tmp_path / "out"), "name": "img-{date}-{seed}-{request_id}"}})
    pipeline = api.load(cfg, host=host)
    result = pipeline.generate(api.GenerationRequest(prompt="a cat", seed=42, request_id="job-1"))
    assert result.path.parent == tmp_path / "out"
    assert result.path.name.startswith("img-2") and result.path.name.endswith("-42-job-1.png")
    for bad in ("../../etc/passwd", "a/b", "", ".x", "x" * 129, "a b"):
        with pytest.raises(RequestError) as info:
            pipeline.generate(api.GenerationRequest(prompt="a cat", seed=1, request_id=bad))
        assert info.value.field == "request_id"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [result.path.name]


def test_an_existing_file_is_replaced_only_when_asked(deployment, capsys):
    target = deployment / "mine.png"
    target.write_bytes(b"precious")
    assert generate(deployment, "--output", str(target)) == 1
    assert "exists" in capsys.readouterr().err and target.read_bytes() == b"precious"
    assert generate(deployment, "--output", str(target), "--overwrite") == 0
    assert Image.open(target).size == (64, 64)
    records = lines(deployment / "logs" / "audit.jsonl")
    assert records[-1]["action"] == "allow" and records[-1]["output"]["path"] == str(target)
    assert records[-1]["output"]["sha256"] == sha(target.read_bytes())
    assert len(records) == 1  # the refusal came before start-up: nothing ran, nothing to record


def test_an_output_that_is_a_folder_or_an_unwritten_format_is_refused_and_audited_as_an_error(deployment, capsys):
    (deployment / "folder.png").mkdir()
    for path, words in ((deployment / "folder.png", "is a folder"), (deployment / "x.gif", "suffix '.gif'"),
                        (deployment / "x", "suffix '(none)'"), (deployment / "x.PNG.txt", "suffix '.txt'")):
        assert generate(deployment, "--output", str(path)) == 1
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
        assert not path.is_file()
    assert not (deployment / "logs" / "audit.jsonl").exists()  # refused before start-up: nothing ran


def test_a_release_is_audited_only_once_the_file_is_in_place(tmp_path, host):
    cfg = api.parse_config({**TINY, "output": {"dir": str(tmp_path / "out")},
                            "safety": {"audit_log": str(tmp_path / "audit.jsonl")}})
    pipeline = api.load(cfg, host=host)
    seen = []
    append = pipeline.stages.audit.append

    def watching(record):
        if record.get("output"):
            path = Path(record["output"]["path"])
            seen.append((path.is_file(), sha(path.read_bytes()) == record["output"]["sha256"]))
        return append(record)

    pipeline.stages.audit.append = watching
    result = pipeline.generate(api.GenerationRequest(prompt="a cat", seed=1))
    assert seen == [(True, True)] and result.path.is_file()

    def failing(record):
        if record.get("output"):
            raise AuditError("disk full", path=str(tmp_path / "audit.jsonl"))
        return append(record)

    pipeline.stages.audit.append = failing
    with pytest.raises(AuditError):
        pipeline.generate(api.GenerationRequest(prompt="a cat", seed=2, request_id="taken-back"))
    assert not (tmp_path / "out" / "taken-back.png").exists()  # no image stays out without its line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [result.path.name]


def test_an_output_folder_that_is_a_file_or_unwritable_stops_start_up_before_weights(tmp_path, host, monkeypatch):
    from fluxframe.plugins.flux2.family import Flux2

    monkeypatch.setattr(Flux2, "load", classmethod(lambda *a: pytest.fail("weights loaded")))
    (tmp_path / "file").write_text("x")
    for folder, words in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "cannot create"),
                          (Path("/proc/fluxframe-out"), "cannot create")):
        cfg = api.parse_config({**TINY, "output": {"dir": str(folder)}})
        with pytest.raises(OutputError, match=words):
            api.load(cfg, host=host)
        with pytest.raises(OutputError, match=words if words == "is a file" else "cannot be created"):
            api.check_config(cfg, host=host)  # config check finds it too, and creates nothing
        assert not folder.exists() or folder.is_file()


# -- class 4: interrupted runs leave nothing where outputs are collected ------------------------------------------

KILLED = """
import sys, time
from pathlib import Path
from fluxframe import api
from fluxframe.core.interfaces import Postprocessor

class Stall(Postprocessor):
    name, order = "stall", 250
    def process_file(self, path, media_type, context):
        Path(sys.argv[2]).write_text(str(path))
        time.sleep(120)

pipeline = api.load(sys.argv[1])
pipeline.stages.postprocessors.append(Stall())
pipeline.generate(api.GenerationRequest(prompt="a red circle", seed=1))
"""


def test_kill_9_while_finishing_leaves_no_output_and_the_next_start_removes_it_audited(deployment, monkeypatch):
    marker = deployment / "writing"
    script = deployment / "killed.py"
    script.write_text(KILLED)
    proc = subprocess.Popen([sys.executable, str(script), str(deployment / "deploy.toml"), str(marker)],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    out = deployment / "out"
    tmp = Path(marker.read_text())
    assert tmp.is_file() and tmp.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a complete, unsigned image ...
    assert [p.name for p in out.iterdir()] == [output_module.TMP_DIR]  # ... never where outputs are collected
    assert tmp.parent.parent == out / output_module.TMP_DIR
    assert os.stat(tmp).st_mode & 0o077 == 0 and os.stat(tmp.parent).st_mode & 0o077 == 0  # owner-only
    leftover = sha(tmp.read_bytes())

    monkeypatch.setattr(output_module, "SWEEP_GRACE_S", 0.0)
    api.load(deployment / "deploy.toml")
    assert not out.joinpath(output_module.TMP_DIR).exists()
    records = lines(deployment / "logs" / "audit.jsonl")
    swept = [r for r in records if r.get("event") == "stale-temporaries-removed"]
    assert len(swept) == 1 and swept[0]["files"][0]["sha256"] == leftover
    assert verify_log(deployment / "logs" / "audit.jsonl").ok


def test_a_live_writers_temporaries_are_not_swept(tmp_path):
    with output_module.workspace(tmp_path) as work:
        (work / "output.png").write_bytes(b"half")
        assert output_module.sweep_stale(tmp_path, grace=0.0) == []
        assert (work / "output.png").exists()
    assert not (tmp_path / output_module.TMP_DIR).exists()  # finished: nothing left at all


# -- class 7: undecodable prompts are refused, and audited --------------------------------------------------------

def test_a_prompt_that_is_not_utf8_on_the_command_line_is_an_error_with_its_audit_line(deployment):
    exe = Path(sys.executable).with_name("fluxframe")
    for flag in ("--prompt", "--negative-prompt"):
        argv = [str(exe).encode(), b"generate", b"--config", str(deployment / "deploy.toml").encode(),
                b"--no-progress", b"--seed", b"1"]
        argv += [b"--prompt", b"a red \xff circle"] if flag == "--prompt" else \
            [b"--prompt", b"a cat", b"--negative-prompt", b"dull \xfe"]
        proc = subprocess.run(argv, capture_output=True, timeout=300)
        err = proc.stderr.decode("utf-8", "replace")
        assert proc.returncode == 1 and "not valid UTF-8" in err and "Traceback" not in err, err
        record = lines(deployment / "logs" / "audit.jsonl")[-1]
        assert record["action"] == "error" and "UTF-8" in record["reasons"][0]
        if flag == "--prompt":  # the hash of the bytes actually given
            assert record["prompt_sha256"] == sha(b"a red \xff circle")
    assert not (deployment / "out").exists() or not any((deployment / "out").iterdir())


def test_a_prompt_with_lone_surrogates_through_the_api_is_refused_and_audited(tmp_path, host):
    cfg = api.parse_config({**TINY, "output": {"dir": str(tmp_path / "out")},
                            "safety": {"audit_log": str(tmp_path / "audit.jsonl")}})
    pipeline = api.load(cfg, host=host)
    with pytest.raises(RequestError, match="not valid UTF-8") as info:
        pipeline.generate(api.GenerationRequest(prompt="a \ud800 cat", seed=1))
    assert info.value.field == "prompt"
    assert lines(tmp_path / "audit.jsonl")[-1]["action"] == "error"
    assert verify_log(tmp_path / "audit.jsonl").ok


def test_encode_output_follows_the_same_rules(deployment, capsys):
    """Found beside class 2: `fluxframe encode --output` could replace the audit log or any file."""
    assert generate(deployment) == 0
    log = deployment / "logs" / "audit.jsonl"
    before = log.read_bytes()
    base = ["encode", "--config", str(deployment / "deploy.toml"), "--prompt", "a cat", "--output"]
    assert main([*base, str(log)]) == 1 and "refused as an output" in capsys.readouterr().err
    assert main([*base, str(deployment / "e.npy")]) == 1 and "'.npy'" in capsys.readouterr().err
    out = deployment / "e.safetensors"
    assert main([*base, str(out)]) == 0
    first = out.read_bytes()
    assert main([*base, str(out)]) == 1 and "exists" in capsys.readouterr().err
    out.write_bytes(b"stale")
    assert main([*base, str(out), "--overwrite"]) == 0 and len(out.read_bytes()) == len(first)
    assert log.read_bytes() == before
