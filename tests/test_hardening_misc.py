"""Hardening (issue 22), assorted defects:

A. a bad image given to `fluxframe check` or `fluxframe verify` (a decompression bomb, truncated, not an image,
   a directory, a FIFO, missing) is a one-line error naming the file, never a traceback;
B. a LoRA weight that is not finite is refused as a usage or config error, and a LoRA whose tensors hold NaN or
   infinities is refused naming the file and the tensor;
C. a LoRA file is read once: its recorded sha256 is of the very bytes its tensors came from;
D. an output too small for the configured watermark is refused before generating, unless the deployment allows
   unmarked small outputs, which are then recorded as such (in the watermark record, hence the manifest);
E. a required filter that checks nothing, or any filter with an unknown target, is a config error.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from provenance_helpers import dev_signer, output_context, write_output
from safetensors.torch import save_file
from torch import nn

from fluxframe import api, hookimpl
from fluxframe.cli import _lora, main
from fluxframe.core.config import load_config, parse_config
from fluxframe.core.interfaces import Filter, Verdict
from fluxframe.core.plugins import PluginHost
from fluxframe.core.policy import TARGETS, ConfiguredFilter, SafetyPolicy
from fluxframe.errors import CheckpointError, ConfigError, ProvenanceError, RequestError, SafetyError
from fluxframe.plugins.lora import LoraSpec, apply_loras, load_lora
from fluxframe.plugins.lora.targets import Segment
from fluxframe.provenance import watermark as wm
from fluxframe.provenance.signing import ASSERTION_LABEL
from fluxframe.provenance.verify import verify

# -- A. bad images: one line naming the file ------------------------------------------------------------------


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A 69-byte PNG whose header claims ``width`` x ``height`` pixels (400 megapixels by default): a 1x1 PNG
    with the IHDR's size patched and its CRC recomputed."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # after the signature (8), IHDR length (4) and type (4)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over type + the 13 data bytes
    path.write_bytes(bytes(data))
    return path


def noise(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def bad_image(kind: str, folder: Path) -> Path:
    if kind == "bomb":
        return bomb_png(folder / "bomb.png")
    if kind == "bomb-jpeg-name":  # the name does not matter, the header does
        return bomb_png(folder / "bomb.jpg", 30000, 9000)
    if kind == "truncated":
        good = io.BytesIO()
        noise().save(good, "PNG")
        (folder / "truncated.png").write_bytes(good.getvalue()[:200])
        return folder / "truncated.png"
    if kind == "text":
        (folder / "notes.png").write_text("not an image at all\n")
        return folder / "notes.png"
    if kind == "empty":
        (folder / "empty.png").write_bytes(b"")
        return folder / "empty.png"
    if kind == "directory":
        (folder / "dir.png").mkdir()
        return folder / "dir.png"
    if kind == "fifo":
        os.mkfifo(folder / "fifo.png")
        return folder / "fifo.png"
    if kind == "missing":
        return folder / "missing.png"
    raise ValueError(kind)


BAD = ["bomb", "bomb-jpeg-name", "truncated", "text", "empty", "directory", "fifo", "missing"]


@pytest.fixture
def plain_config(tmp_path):
    """A deployment without filters: `check` still has to open every image it is given."""
    path = tmp_path / "deploy.toml"
    path.write_text('[model]\npreset = "tiny"\n')
    return path


def one_line_naming(err: str, path: Path) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and "Traceback" not in err, err
    assert lines[0].startswith("fluxframe: error: ")
    return lines[0]


@pytest.mark.parametrize("option", ["--image", "--output-image"])
@pytest.mark.parametrize("kind", BAD)
def test_check_refuses_a_bad_image_in_one_line(plain_config, tmp_path, capsys, kind, option):
    path = bad_image(kind, tmp_path)
    assert main(["check", "--config", str(plain_config), "--prompt", "a lighthouse", option, str(path)]) == 1
    out = capsys.readouterr()
    line = one_line_naming(out.err, path)
    assert option in line  # which argument the file came from
    if kind.startswith("bomb"):
        assert "too many pixels" in line


def test_check_names_the_bad_one_of_several_images(plain_config, tmp_path, capsys):
    good = tmp_path / "good.png"
    noise().save(good)
    bomb = bomb_png(tmp_path / "bomb.png")
    code = main(["check", "--config", str(plain_config), "--prompt", "x", "--image", str(good), "--image", str(bomb)])
    assert code == 1
    assert "bomb.png" in one_line_naming(capsys.readouterr().err, bomb)
    # and a good image still checks
    assert main(["check", "--config", str(plain_config), "--prompt", "x", "--image", str(good),
                 "--output-image", str(good)]) == 0


@pytest.mark.parametrize("kind", BAD)
def test_verify_refuses_a_bad_image_in_one_line(tmp_path, capsys, kind):
    path = bad_image(kind, tmp_path)
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr()
    assert out.out == ""  # no report: the file could not be checked at all
    one_line_naming(out.err, path)
    with pytest.raises(ProvenanceError) as info:
        verify(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_a_bomb_is_one_line_from_the_real_command(plain_config, tmp_path):
    """The same through a fresh interpreter, as a user runs it: nothing but the one line on stderr."""
    import fluxframe

    bomb = bomb_png(tmp_path / "big.png")
    # this checkout's fluxframe, wherever the interpreter's installed one points
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fluxframe.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    for argv in (["verify", str(bomb)], ["check", "--config", str(plain_config), "--prompt", "x", "--image",
                                         str(bomb)]):
        done = subprocess.run([sys.executable, "-m", "fluxframe.cli", *argv], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env=env)
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
        assert str(bomb) in done.stderr and "too many pixels" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return dev_signer(tmp_path_factory.mktemp("dev-certs"))


def test_verify_reads_the_file_once_and_checks_manifest_and_pixels_from_those_bytes(dev, tmp_path, monkeypatch):
    signer, paths = dev
    out = write_output(noise((320, 320), seed=3), tmp_path / "out.png", [wm.WatermarkPostprocessor(), signer],
                       output_context())
    opened = count_opens(monkeypatch, out)
    report = verify(out, trust=[paths["ca"]])
    assert report.ok, report.summary()
    assert opened == [str(out)]  # one open: the manifest and the watermark were checked from one copy


# -- B. LoRA weights and tensors that are not finite -----------------------------------------------------------


@pytest.mark.parametrize("weight", ["nan", "NaN", "inf", "-inf", "+inf", "Infinity", "-infinity"])
def test_cli_refuses_a_non_finite_lora_weight_as_usage_error(plain_config, tmp_path, capsys, weight):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(SystemExit) as info:
        main(["generate", "--config", str(plain_config), "--prompt", "x", "--lora", f"{lora}:{weight}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --lora" in err and "not a finite number" in err and weight in err and "Traceback" not in err


@pytest.mark.parametrize(("text", "expected"), [
    ("a.safetensors:0.5", ("a.safetensors", 0.5)),
    ("a.safetensors:-1.25e-1", ("a.safetensors", -0.125)),
    ("a.safetensors", ("a.safetensors", 1.0)),
    ("dir:with:colons/a.safetensors", ("dir:with:colons/a.safetensors", 1.0)),
])
def test_cli_still_reads_finite_lora_weights(text, expected):
    path, weight = _lora(text)
    assert (str(path), weight) == expected


def test_a_file_named_like_a_non_finite_weight_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("odd:inf").write_bytes(b"")  # "odd" does not exist, "odd:inf" does: it is the file's name
    assert _lora("odd:inf") == (Path("odd:inf"), 1.0)
    Path("odd").write_bytes(b"")  # now both exist: the weight reading wins, and it is refused
    with pytest.raises(Exception, match="not a finite number"):
        _lora("odd:inf")


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), float("-inf"), "nan", "abc", None, [1.0]])
def test_with_loras_raises_config_error_naming_the_entry(weight):
    config = parse_config({"model": {"preset": "tiny"}})
    with pytest.raises(ConfigError) as info:
        api.with_loras(config, [("good.safetensors", 0.5), ("bad.safetensors", weight)])
    assert info.value.key.startswith("--lora bad.safetensors:")
    assert "must be" in str(info.value)


def test_with_loras_keeps_good_entries():
    config = parse_config({"model": {"preset": "tiny"}, "lora": [{"path": "/x/a.safetensors", "weight": 0.2}]})
    out = api.with_loras(config, [("b.safetensors", 2), ("c.safetensors", -0.5)])
    assert [(Path(e.path).name, e.weight) for e in out.lora] == [("a.safetensors", 0.2), ("b.safetensors", 2.0),
                                                                  ("c.safetensors", -0.5)]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan"])
@pytest.mark.parametrize("index", [0, 1])
def test_toml_lora_weight_that_is_not_finite_names_the_key(tmp_path, value, index):
    entries = ['[[lora]]\npath = "a.safetensors"\nweight = 0.5\n'] * index
    entries.append(f'[[lora]]\npath = "b.safetensors"\nweight = {value}\n')
    path = tmp_path / "deploy.toml"
    path.write_text('[model]\npreset = "tiny"\n\n' + "\n".join(entries))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == f"lora.{index}.weight" and "finite" in str(info.value)


class Tiny(nn.Module):
    """One linear layer, the target of the test LoRAs ("proj")."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 6)


TARGETS_TINY = {"proj": [Segment("proj", 0, 0, 6)]}


def write_tiny_lora(path: Path, seed: int = 0, *, down=None, up=None, dtype=torch.float32, metadata=None) -> Path:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(2, 8, generator=g) if down is None else down
    up = torch.randn(6, 2, generator=g) if up is None else up
    save_file({"transformer.proj.lora_A.weight": down.to(dtype).contiguous(),
               "transformer.proj.lora_B.weight": up.to(dtype).contiguous()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("mode", ["fuse", "side"])
@pytest.mark.parametrize(("role", "value"), [("A", float("nan")), ("B", float("inf")), ("A", float("-inf")),
                                             ("B", float("nan"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_lora_holding_nan_or_inf_is_refused_naming_file_and_tensor(tmp_path, mode, role, value, dtype):
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    (down if role == "A" else up)[1, 1] = value
    path = write_tiny_lora(tmp_path / "bad.safetensors", down=down, up=up, dtype=dtype)
    model = Tiny()
    before = model.proj.weight.detach().clone()
    with pytest.raises(CheckpointError, match="NaN or infinite") as info:
        apply_loras(model, TARGETS_TINY, [LoraSpec(path, 1.0, mode)], device="cpu")
    assert info.value.file == str(path) and info.value.key == f"transformer.proj.lora_{role}.weight"
    assert isinstance(model.proj, nn.Linear) and torch.equal(model.proj.weight, before)


# -- C. a LoRA file is read once --------------------------------------------------------------------------------


def count_opens(monkeypatch, path: Path) -> list[str]:
    """Every open of ``path`` from Python (os.open, open, io.open) from now on, as a list that fills in."""
    opened: list[str] = []
    target = os.path.realpath(path)

    def wrap(real):
        def opener(file, *args, **kwargs):
            if isinstance(file, str | bytes | os.PathLike) and os.path.realpath(os.fsdecode(file)) == target:
                opened.append(os.fsdecode(file))
            return real(file, *args, **kwargs)
        return opener

    monkeypatch.setattr(os, "open", wrap(os.open))
    monkeypatch.setattr(builtins, "open", wrap(builtins.open))
    monkeypatch.setattr(io, "open", wrap(io.open))
    return opened


@pytest.mark.parametrize("mode", ["fuse", "side"])
def test_a_lora_file_is_opened_once(tmp_path, monkeypatch, mode):
    path = write_tiny_lora(tmp_path / "a.safetensors")
    opened = count_opens(monkeypatch, path)
    applied = apply_loras(Tiny(), TARGETS_TINY, [LoraSpec(path, 0.5, mode)], device="cpu")
    assert opened == [str(path)]
    assert applied.records[0]["sha256"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["fuse", "side"])
def test_a_lora_replaced_while_it_is_read_is_recorded_as_the_one_applied(tmp_path, monkeypatch, mode):
    """The file is swapped for another LoRA right after it is first opened: whatever the loader reads after
    that would be the other file. The hash recorded and the update applied must both be the first file's."""
    path = write_tiny_lora(tmp_path / "a.safetensors", seed=1)
    first = path.read_bytes()
    other = write_tiny_lora(tmp_path / "other.safetensors", seed=2)
    real_os_open, real_open = os.open, builtins.open
    swapped = []

    def swap_after(real):
        def opener(file, *args, **kwargs):
            result = real(file, *args, **kwargs)
            if not swapped and isinstance(file, str | os.PathLike) and os.fspath(file) == str(path):
                swapped.append(True)
                os.replace(other, path)  # a new inode: what is open stays the first file
            return result
        return opener

    monkeypatch.setattr(os, "open", swap_after(real_os_open))
    monkeypatch.setattr(builtins, "open", swap_after(real_open))
    model = Tiny()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        base = model.proj(x)
    applied = apply_loras(model, TARGETS_TINY, [LoraSpec(path, 0.5, mode)], device="cpu")
    monkeypatch.undo()
    assert swapped and path.read_bytes() != first  # the swap happened
    assert applied.records[0]["sha256"] == "sha256:" + hashlib.sha256(first).hexdigest()
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    with torch.no_grad():
        assert torch.allclose(model.proj(x), base + 0.5 * (x @ down.t()) @ up.t(), atol=1e-5)
        # replacing the file again after loading changes nothing either
        write_tiny_lora(path, seed=3)
        assert torch.allclose(model.proj(x), base + 0.5 * (x @ down.t()) @ up.t(), atol=1e-5)


def test_load_lora_gives_hash_layers_and_metadata_from_one_read(tmp_path):
    path = write_tiny_lora(tmp_path / "m.safetensors", metadata={"ss_network_dim": "2", "note": "ünïcode"})
    lora = load_lora(path)
    assert lora.sha256 == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert lora.metadata == {"ss_network_dim": "2", "note": "ünïcode"}
    assert [(layer.name, tuple(layer.down.shape), tuple(layer.up.shape)) for layer in lora.layers] == \
        [("proj", (2, 8), (6, 2))]
    # the tensors own their memory: writing to them is safe and does not touch another load
    lora.layers[0].down.add_(1)
    assert not torch.equal(load_lora(path).layers[0].down, lora.layers[0].down)


def test_load_lora_refusals_name_the_file(tmp_path):
    good = write_tiny_lora(tmp_path / "good.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[:-10])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_lora(cut)
    assert info.value.file == str(cut) and info.value.key == "transformer.proj.lora_B.weight"
    header = tmp_path / "header.safetensors"
    header.write_bytes(good[:30])
    with pytest.raises(CheckpointError, match="header claims"):
        load_lora(header)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a file"):  # and does not hang
        load_lora(fifo)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors")
    pickled = tmp_path / "lora.ckpt"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.MonkeyPatch.context() as mp:
        opened = count_opens(mp, pickled)
        with pytest.raises(CheckpointError, match="pickle"):
            load_lora(pickled)
    assert opened == []  # refused by name, never opened
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_lora(junk)


# -- D. outputs too small for the watermark -------------------------------------------------------------------


@pytest.mark.parametrize(("method", "width", "height", "field"), [
    ("dwtDct", 512, 64, "height"),
    ("dwtDct", 64, 512, "width"),
    ("dwtDct", 255, 256, "width"),
    ("dwtDct", 128, 128, "width"),
    ("dwtDctSvd", 200, 300, "width"),
    ("fluxframe-ss", 511, 128, "height"),  # under 512 per edge, and 65408 pixels: under dwtDct's fallback too
    ("fluxframe-ss", 200, 200, "width"),
    ("fluxframe-ss", 16, 2048, "width"),
])
def test_check_size_refuses_unmarkable_sizes_by_default(method, width, height, field):
    post = wm.WatermarkPostprocessor(method)
    with pytest.raises(RequestError) as info:
        post.check_size(width, height)
    message = str(info.value)
    assert info.value.field == field
    assert f"{width}x{height}" in message and method in message and str(wm.MIN_AREA) in message
    assert "allow_unmarked_small = true" in message and "refuses unmarked outputs" in message
    # allowed, it passes
    wm.WatermarkPostprocessor(method, allow_unmarked_small=True).check_size(width, height)


@pytest.mark.parametrize(("method", "width", "height"), [
    ("dwtDct", 256, 256), ("dwtDct", 1024, 64), ("dwtDct", 64, 1024), ("dwtDctSvd", 512, 512),
    ("fluxframe-ss", 512, 512), ("fluxframe-ss", 512, 128),  # dwtDct fallback: 65536 pixels
    ("fluxframe-ss", 2048, 32), ("fluxframe-ss", 1024, 1024),
])
def test_check_size_allows_markable_sizes(method, width, height):
    wm.WatermarkPostprocessor(method).check_size(width, height)
    assert wm.unmarked_reason(width, height, method) is None


def test_unmarked_reason_agrees_with_what_process_image_does():
    """check_size refuses exactly the sizes process_image would leave unmarked."""
    for method in ("dwtDct", "fluxframe-ss"):
        post = wm.WatermarkPostprocessor(method)
        for size in ((128, 128), (256, 256), (511, 128), (512, 128), (300, 200), (512, 512), (1024, 64)):
            context = output_context()
            post.process_image(noise(size), context)
            marked = context.records["watermark"]["applied"]
            assert (wm.unmarked_reason(*size, method) is None) == marked, (method, size)


@pytest.mark.parametrize("method", ["dwtDct", "fluxframe-ss"])
def test_allowed_small_output_is_unmarked_and_says_so(method):
    post = wm.WatermarkPostprocessor(method, allow_unmarked_small=True)
    image = noise((128, 96))
    context = output_context()
    out = post.process_image(image, context)
    record = context.records["watermark"]
    assert np.array_equal(np.asarray(out), np.asarray(image))
    assert record["applied"] is False and record["allowed_unmarked"] is True
    assert "allow_unmarked_small" in record["reason"] and "128x96" in record["reason"]
    # large enough: marked as always, and no "allowed_unmarked" claim
    context = output_context()
    post.process_image(noise((512, 512)), context)
    assert context.records["watermark"]["applied"] is True and "allowed_unmarked" not in context.records["watermark"]


def test_unmarked_without_permission_is_recorded_as_not_allowed():
    """A caller that skips check_size still gets no silent pass: the record says the output was not allowed."""
    context = output_context()
    wm.WatermarkPostprocessor("dwtDct").process_image(noise((64, 64)), context)
    assert context.records["watermark"]["applied"] is False
    assert context.records["watermark"]["allowed_unmarked"] is False


def test_allow_unmarked_small_config_and_factory(host):
    config = parse_config({"model": {"preset": "tiny"}, "provenance": {"watermark": {"method": "dwtDct"}}})
    assert config.provenance.watermark.allow_unmarked_small is False
    config = parse_config({"model": {"preset": "tiny"},
                           "provenance": {"watermark": {"allow_unmarked_small": True}}})
    assert config.provenance.watermark.allow_unmarked_small is True
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"preset": "tiny"}, "provenance": {"watermark": {"allow_unmarked_small": "yes"}}})
    assert info.value.key == "provenance.watermark.allow_unmarked_small"
    # the factory the runner calls takes the option by keyword, default False
    factory = host.get("postprocessor", "watermark").factory
    assert factory(method="dwtDct", message=None).allow_unmarked_small is False
    post = factory(method="dwtDct", message=None, allow_unmarked_small=True)
    post.check_size(64, 64)
    with pytest.raises(ProvenanceError, match="allow_unmarked_small"):
        factory(method="dwtDct", message=None, allow_unmarked_small="true")


def test_allowed_unmarked_output_is_stated_in_the_signed_manifest(dev, tmp_path):
    signer, paths = dev
    post = wm.WatermarkPostprocessor("fluxframe-ss", allow_unmarked_small=True)
    post.check_size(160, 128)
    out = write_output(noise((160, 128)), tmp_path / "small.png", [post, signer], output_context())
    report = verify(out, trust=[paths["ca"]])
    assert report.ok, report.summary()
    declared = report.fluxframe["watermark"]
    assert declared["applied"] is False and declared["allowed_unmarked"] is True
    assert any("allow_unmarked_small" in note for note in report.notes)
    # read straight from the manifest, not through verify's interpretation
    import c2pa

    context = c2pa.Context.from_dict({"trust": {"user_anchors": Path(paths["ca"]).read_text()}})
    with open(out, "rb") as fh, c2pa.Reader("image/png", fh, context=context) as reader:
        manifest = json.loads(reader.json())
    active = manifest["manifests"][manifest["active_manifest"]]
    ours = next(a for a in active["assertions"] if a["label"] == ASSERTION_LABEL)["data"]
    assert ours["watermark"]["allowed_unmarked"] is True and ours["watermark"]["applied"] is False


# -- E. filter targets ------------------------------------------------------------------------------------------


class Targeted(Filter):
    """Blocks everything it checks; what it checks is its ``targets`` option."""

    version = "t"

    def __init__(self, name, targets):
        self.name = name
        self.targets = targets

    def check_prompt(self, text, target):
        return Verdict(self.name, self.version, False, target, reason="no")

    check_image = check_prompt


class NoTargets(Filter):
    """A filter class that forgot to say what it checks (Filter's default: nothing)."""

    name = "no-targets"

    def check_prompt(self, text, target):
        return Verdict(self.name, "0", False, target)

    check_image = check_prompt


class TargetFilters:
    @hookimpl
    def register_filters(self, register):
        register("targeted", lambda targets=("prompt",): Targeted("targeted", targets))
        register("no-targets", lambda: NoTargets())


@pytest.fixture
def thost():
    h = PluginHost(load_entry_points=False)
    h.add(TargetFilters(), name="target-filters")
    return h


def policy(host, filters, require=()):
    config = parse_config({"model": {"preset": "tiny"}, "safety": {"require": list(require), "filters": filters}})
    return SafetyPolicy.from_config(config.safety, host)


@pytest.mark.parametrize("targets", [[], ()])
def test_a_required_filter_with_empty_targets_is_refused(thost, targets):
    with pytest.raises(ConfigError, match="required filter checks nothing: its targets are empty") as info:
        policy(thost, {"targeted": {"targets": list(targets)}}, require=["targeted"])
    assert info.value.key == "safety.filters.targeted"


def test_a_required_filter_class_without_targets_is_refused(thost):
    with pytest.raises(ConfigError, match="checks nothing") as info:
        policy(thost, {}, require=["no-targets"])
    assert info.value.key == "safety.filters.no-targets"
    # built by hand, not from a config: the same check
    with pytest.raises(ConfigError, match="checks nothing"):
        SafetyPolicy([ConfiguredFilter("no-targets", NoTargets(), True)])


def test_an_optional_filter_with_empty_targets_loads_and_warns(thost, caplog):
    p = policy(thost, {"targeted": {"targets": []}})
    assert "checks nothing" in caplog.text
    assert p.check_prompts({"prompt": "x"}).allowed  # it checks nothing, and says so in the log


@pytest.mark.parametrize("required", [True, False])
@pytest.mark.parametrize("bad", ["promt", "output-image", "image", "Prompt", "negative prompt"])
def test_an_unknown_target_is_refused(thost, required, bad):
    with pytest.raises(ConfigError, match=f"unknown target {bad!r}") as info:
        policy(thost, {"targeted": {"targets": ["prompt", bad]}}, require=["targeted"] if required else [])
    assert info.value.key == "safety.filters.targeted"


@pytest.mark.parametrize("targets", [["prompt"], ["upsampled_prompt"], ["input_image"], ["output_image"],
                                     list(TARGETS)])
def test_known_targets_load_and_are_checked(thost, targets):
    p = policy(thost, {"targeted": {"targets": targets}}, require=["targeted"])
    image = Image.new("RGB", (8, 8))
    blocked = {
        "prompt": not p.check_prompts({"prompt": "x"}).allowed,
        "upsampled_prompt": not p.check_prompts({"upsampled_prompt": "x"}).allowed,
        "input_image": not p.check_input_images([("reference[0]", image)]).allowed,
        "output_image": not p.check_output(image).allowed,
    }
    assert {t for t, b in blocked.items() if b} == {t for t in targets if t != "negative_prompt"} | (
        {"upsampled_prompt"} if "prompt" in targets else set())


def test_targets_given_as_a_string_are_refused(thost):
    with pytest.raises(SafetyError, match="not a Filter"):  # a required filter whose result is no Filter
        policy(thost, {"targeted": {"targets": "prompt"}}, require=["targeted"])
    with pytest.raises(ConfigError, match="must be a set of target names"):
        SafetyPolicy([ConfiguredFilter("t", Targeted("t", "prompt"), False)])


@pytest.mark.parametrize("name", ["prompt-nsfw", "image-nsfw", "ip"])
def test_built_in_filters_take_no_targets_option(host, name):
    """Their targets are fixed by what each model can judge; `targets = []` is refused, not silently obeyed."""
    for required in (True, False):
        with pytest.raises(ConfigError, match="unknown option") as info:
            policy(host, {name: {"targets": []}}, require=[name] if required else [])
        assert info.value.key == f"safety.filters.{name}.targets"


def test_built_in_filter_targets_are_all_known():
    from fluxframe.safety.image_nsfw import IMAGE_TARGETS
    from fluxframe.safety.ip import TARGETS as IP_TARGETS
    from fluxframe.safety.prompt_nsfw import PROMPT_TARGETS

    for targets in (IMAGE_TARGETS, IP_TARGETS, PROMPT_TARGETS):
        assert targets and set(targets) <= set(TARGETS)
