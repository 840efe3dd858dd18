"""``fluxframe train-lora`` on a tiny FLUX.2 base (diffusers' own save_pretrained): the loss falls, an interrupted
run continues from its checkpoint to the very file an uninterrupted run writes, blocked items are skipped and
recorded, diffusers' ``load_lora_weights`` draws the same image as fluxframe with the LoRA, and bad input is a
one-line error naming the file with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

from fluxframe import api, hookimpl
from fluxframe.core.interfaces import Filter, Verdict
from fluxframe.demo import train_lora
from fluxframe.errors import TrainingError

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
OPTIONS = dict(rank=4, steps=6, lr=5e-3, batch_size=2, resolution=32, seed=3, checkpoint_every=2)


class Keyword(Filter):
    """Blocks captions with the word "forbidden" and images whose top-left pixel is pure magenta."""

    name, version = "keyword", "1"
    targets = frozenset({"prompt", "input_image"})

    def check_prompt(self, text, target):
        return Verdict(self.name, self.version, "forbidden" not in text, target, reason="forbidden word")

    def check_image(self, image, target):
        ok = image.convert("RGB").getpixel((0, 0)) != (255, 0, 255)
        return Verdict(self.name, self.version, ok, target, reason="magenta corner")


class KeywordPlugin:
    @hookimpl
    def register_filters(self, register):
        register("keyword", Keyword)


@pytest.fixture
def lora_host(host):
    host.add(KeywordPlugin(), name="keyword-plugin")
    return host


def draw(colour, size=32, corner=None):
    image = Image.new("RGB", (size, size), (245, 245, 245))
    ImageDraw.Draw(image).rectangle((8, 8, 24, 24), fill=COLOURS[colour])
    if corner:
        image.putpixel((0, 0), corner)
    return image


def make_data(folder, colours=tuple(COLOURS), extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    for colour in colours:
        draw(colour).save(folder / f"{colour}.png")
        (folder / f"{colour}.txt").write_text(f"a {colour} square, hollow style\n")
    for name, (image, caption) in (extra or {}).items():
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    return folder


def config(folder, tmp_path, audit=False, **extra):
    return api.parse_config({
        "model": {"family": "flux2", "path": str(folder), "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 2, "guidance": 3.5, "width": 32, "height": 32},
        "output": {"dir": str(tmp_path / "outputs")},
        "safety": {"filters": {"keyword": {}}, **({"audit_log": str(tmp_path / "audit.jsonl")} if audit else {})},
        **extra,
    })


def written(folder):
    return sorted(p.name for p in folder.iterdir())


def test_train_resume_record_and_both_tools(diffusers_flux2_folder, lora_host, tmp_path):
    from diffusers import Flux2Pipeline

    data = make_data(tmp_path / "data", extra={"bad": (draw("red"), "a forbidden square"),
                                               "pink": (draw("blue", corner=(255, 0, 255)), "a blue square")})
    cfg = config(diffusers_flux2_folder, tmp_path)

    # interrupted after 3 of 6 steps (checkpoints every 2): the state of step 3 is on disk, no LoRA yet
    out = tmp_path / "run" / "style.safetensors"
    train_lora.train(cfg, data, out, host=lora_host, stop_after=3, **OPTIONS)
    assert not out.exists()
    assert torch.load(out.with_name(".style.safetensors.train.pt"), weights_only=False)["state"]["step"] == 3
    train_lora.train(cfg, data, out, host=lora_host, **OPTIONS)  # the same command again: continues
    assert written(out.parent) == ["style.safetensors", "style.training.json"]  # checkpoint and cache removed

    straight = tmp_path / "straight" / "style.safetensors"
    train_lora.train(cfg, data, straight, host=lora_host, **OPTIONS)
    ours, theirs = load_file(out), load_file(straight)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit for bit

    # diffusers layout: the double blocks' q/k/v/out and the single blocks' fused projection, nothing else
    layers = {k.rsplit(".lora_", 1)[0] for k in ours}
    assert layers == {f"transformer.transformer_blocks.{n}.attn.{p}" for n in range(2)
                      for p in ("to_q", "to_k", "to_v", "to_out.0")} | {
        f"transformer.single_transformer_blocks.{n}.attn.to_qkv_mlp_proj" for n in range(2)}
    assert all(v.dtype == torch.float32 for v in ours.values())
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in ours.items())

    record = json.loads((out.parent / "style.training.json").read_text())
    assert record["trained_on"] == 4 and record["items"] == 6 and len(record["losses"]) == 6
    assert [s["file"] for s in record["skipped"]] == ["bad.png", "pink.png"]
    assert record["skipped"][0]["stage"] == "prompts" and record["skipped"][1]["stage"] == "input_images"
    assert record["rank"] == 4 and record["alpha"] == 4.0 and record["steps"] == 6 and record["seed"] == 3
    assert record["base_checkpoint"] and record["dataset_sha256"].startswith("sha256:")
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["dataset_sha256"] == record["dataset_sha256"] and meta["base_checkpoint"] == record["base_checkpoint"]
    assert json.loads(meta["skipped"]) == record["skipped"] and meta["rank"] == "4" and meta["seed"] == "3"

    # fluxframe reads back exactly the matrices written, and every layer lands
    from fluxframe.plugins.lora import load_lora

    loaded = load_lora(out)
    for layer in loaded.layers:
        assert torch.equal(layer.down, ours[f"transformer.{layer.name}.lora_A.weight"])
        assert torch.equal(layer.up, ours[f"transformer.{layer.name}.lora_B.weight"])
        assert layer.alpha is None  # folded: scale 1 in every reader

    # the same image in both tools (a LoRA strong enough to change it)
    boosted = tmp_path / "boosted.safetensors"
    from safetensors.torch import save_file

    save_file({k: v * 3 if "lora_B" in k else v for k, v in ours.items()}, str(boosted))
    prompt, seed = "a red square, hollow style", 5
    plain = api.load(cfg, host=lora_host).generate(api.GenerationRequest(prompt=prompt, seed=seed), write=False)
    styled = api.load(config(diffusers_flux2_folder, tmp_path, lora=[{"path": str(boosted)}]), host=lora_host)
    assert styled.stages.model.describe()["loras"][0]["layers"] == len(layers)
    mine = np.asarray(styled.generate(api.GenerationRequest(prompt=prompt, seed=seed), write=False).image, np.int16)
    ref = Flux2Pipeline.from_pretrained(diffusers_flux2_folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(boosted))
    image = ref(prompt=prompt, width=32, height=32, num_inference_steps=2, guidance_scale=3.5,
                generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    theirs_image = np.asarray(image, np.int16)
    assert np.abs(mine - theirs_image).max() <= 2
    assert np.abs(mine - np.asarray(plain.image, np.int16)).max() > 2  # the LoRA did change the image


def test_the_loss_falls(diffusers_flux2_folder, lora_host, tmp_path):
    data = make_data(tmp_path / "data", colours=("red",))
    out = tmp_path / "style.safetensors"
    train_lora.train(config(diffusers_flux2_folder, tmp_path), data, out, host=lora_host,
                     **{**OPTIONS, "steps": 30, "lr": 2e-2, "batch_size": 4, "rank": 8})
    record = json.loads((tmp_path / "style.training.json").read_text())
    # at fixed noise and sigmas; the tiny random base attends mostly to 512 padding tokens, so a LoRA of its
    # attention moves it by about a tenth in 30 steps (deterministic: fixed seeds)
    assert record["probe_loss_end"] < 0.95 * record["probe_loss_start"]
    assert np.mean(record["losses"][-10:]) < np.mean(record["losses"][:10])


def _bad(tmp_path, case):
    """(data folder, options, the file the error must name) for each kind of bad input."""
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
        return data, {}, str(data)
    make_data(data, colours=("red", "green"))
    if case == "no caption":
        (data / "green.txt").unlink()
        return data, {}, str(data / "green.png")
    if case == "no image":
        (data / "green.png").unlink()
        return data, {}, str(data / "green.txt")
    if case == "unreadable":
        (data / "green.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        return data, {}, str(data / "green.png")
    if case == "huge":
        draw("green", size=64).save(data / "green.png")
        return data, {"huge": True}, str(data / "green.png")
    if case == "rank":
        return data, {"rank": 64}, "transformer_blocks.0.attn.to_q"
    if case == "all blocked":
        for name in ("red", "green"):
            (data / f"{name}.txt").write_text("forbidden")
        return data, {}, str(data / "green.png")
    if case == "strict":
        (data / "red.txt").write_text("a forbidden square")
        return data, {"strict": True}, str(data / "red.png")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["empty", "no caption", "no image", "unreadable", "huge", "rank", "all blocked",
                                  "strict"])
def test_bad_input_is_one_line_naming_the_file_and_writes_nothing(diffusers_flux2_folder, lora_host, tmp_path,
                                                                   monkeypatch, case):
    data, options, named = _bad(tmp_path, case)
    if options.pop("huge", False):
        monkeypatch.setattr(train_lora, "MAX_IMAGE_PIXELS", 40 * 40)
    out = tmp_path / "out" / "style.safetensors"
    out.parent.mkdir()
    with pytest.raises(TrainingError) as err:
        train_lora.train(config(diffusers_flux2_folder, tmp_path), data, out, host=lora_host,
                         **{**OPTIONS, **options})
    message = str(err.value)
    assert named in message and "\n" not in message
    assert written(out.parent) == []


def test_out_may_not_reach_a_file_the_deployment_guards(diffusers_flux2_folder, lora_host, tmp_path):
    """--out inside the base checkpoint (a LoRA written over the transformer's weights), or an --out whose record
    beside it would be the audit log: refused before anything loads, every guarded file untouched."""
    import hashlib
    import shutil

    base = shutil.copytree(diffusers_flux2_folder, tmp_path / "base")
    weights = next((base / "transformer").glob("*.safetensors"))
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    data = make_data(tmp_path / "data", colours=("red",))
    (tmp_path / "run").mkdir()
    audit_log = tmp_path / "run" / "style.training.json"  # an odd name for a log, but the deployment's own
    cfg = config(base, tmp_path, safety={"filters": {"keyword": {}}, "audit_log": str(audit_log)})
    for out, guarded in ((weights, str(weights)), (tmp_path / "run" / "style.safetensors", str(audit_log))):
        with pytest.raises(TrainingError) as err:
            train_lora.train(cfg, data, out, host=lora_host, **OPTIONS)
        assert str(err.value).startswith(f"--out {out}: ") and guarded in str(err.value)
        assert "\n" not in str(err.value)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before
    assert written(base / "transformer") == sorted(p.name for p in (diffusers_flux2_folder / "transformer").iterdir())
    assert written(tmp_path / "run") == []


def test_a_finished_loras_file_is_replaced_only_with_overwrite(diffusers_flux2_folder, lora_host, tmp_path):
    data = make_data(tmp_path / "data", colours=("red",))
    cfg = config(diffusers_flux2_folder, tmp_path)
    out = tmp_path / "run" / "style.safetensors"
    options = {**OPTIONS, "steps": 2}
    train_lora.train(cfg, data, out, host=lora_host, **options)
    first = out.read_bytes()
    with pytest.raises(TrainingError, match="exists; pass --overwrite") as err:
        train_lora.train(cfg, data, out, host=lora_host, **{**options, "seed": 4})
    assert str(err.value).startswith(f"--out {out}: ") and out.read_bytes() == first
    assert written(out.parent) == ["style.safetensors", "style.training.json"]
    train_lora.train(cfg, data, out, host=lora_host, overwrite=True, **{**options, "seed": 4})
    assert out.read_bytes() != first
    assert json.loads((out.parent / "style.training.json").read_text())["seed"] == 4


def test_a_run_removes_the_temporaries_a_killed_run_left(diffusers_flux2_folder, lora_host, tmp_path, monkeypatch):
    """A kill -9 mid-write leaves atomic_write's temporary (hidden, named after the file it was writing: the LoRA,
    its record, the resumable state, the encoding cache); the next run of the same --out removes them."""
    import os

    from fluxframe.core import files

    out = tmp_path / "run" / "style.safetensors"
    out.parent.mkdir()
    monkeypatch.setattr(os, "getpid", lambda: 4242)  # as a killed process would have named them
    left = [files._temporary(p, "tmp") for p in (out, *train_lora._paths(out).values())]
    monkeypatch.undo()
    for path in left:
        path.write_bytes(b"cut short")
    (out.parent / "other.safetensors.tmp-4242").write_bytes(b"not ours")  # another file's: kept
    train_lora.train(config(diffusers_flux2_folder, tmp_path), make_data(tmp_path / "data", colours=("red",)), out,
                     host=lora_host, **{**OPTIONS, "steps": 2})
    assert written(out.parent) == ["other.safetensors.tmp-4242", "style.safetensors", "style.training.json"]


def test_cli_registers_train_lora_and_reports_errors_on_one_line(lora_host, tmp_path, capsys):
    from fluxframe.cli import main

    (tmp_path / "empty").mkdir()
    cfg = tmp_path / "deploy.toml"
    cfg.write_text('[model]\npreset = "tiny"\ndtype = "float32"\ndevice = "cpu"\n')
    with pytest.raises(SystemExit):
        main(["train-lora", "--help"], host=lora_host)
    assert "--rank" in capsys.readouterr().out
    rc = main(["train-lora", "--config", str(cfg), "--data", str(tmp_path / "empty"), "--out",
               str(tmp_path / "style.safetensors")], host=lora_host)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0 and str(tmp_path / "empty") in err


def test_kill_9_then_the_same_command_continues(diffusers_flux2_folder, tmp_path):
    """The real thing: the CLI in a subprocess, killed with SIGKILL once its first checkpoint is on disk; the same
    command then resumes from that checkpoint and finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = make_data(tmp_path / "data", colours=("red", "blue"))
    cfg = tmp_path / "deploy.toml"
    cfg.write_text(f'[model]\nfamily = "flux2"\npath = "{diffusers_flux2_folder}"\ndtype = "float32"\n'
                   f'device = "cpu"\n\n[output]\ndir = "{tmp_path / "outputs"}"\n')
    out = tmp_path / "run" / "style.safetensors"
    state = out.with_name(".style.safetensors.train.pt")
    command = [sys.executable, "-m", "fluxframe.cli", "train-lora", "--config", str(cfg), "--data", str(data),
               "--out", str(out), "--rank", "2", "--steps", "40", "--resolution", "32", "--checkpoint-every", "2"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert state.exists() and not out.exists(), "killed before its first checkpoint, or finished before the kill"
    step = torch.load(state, weights_only=False)["state"]["step"]
    assert 2 <= step < 40

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed_at = int(done.stderr.split("resuming style.safetensors at step ")[1].split()[0])
    assert resumed_at >= step and resumed_at % 2 == 0
    record = json.loads((out.parent / "style.training.json").read_text())
    assert len(record["losses"]) == 40 and record["command"].startswith("fluxframe train-lora --config")
    assert written(out.parent) == ["style.safetensors", "style.training.json"]


def test_klein_base_trains_without_guidance_embedding(klein_folders, lora_host, tmp_path):
    """klein (Qwen3 text encoder, no guidance embedder): trains, and the file loads and changes the image."""
    data = make_data(tmp_path / "data", colours=("green",))
    out = tmp_path / "klein.safetensors"
    (data / "bad.png").write_bytes((data / "green.png").read_bytes())
    (data / "bad.txt").write_text("a forbidden xyzzy")
    cfg = config(klein_folders["base"], tmp_path, audit=True)
    train_lora.train(cfg, data, out, host=lora_host, **{**OPTIONS, "steps": 2, "checkpoint_every": 1})
    from fluxframe.core.audit import verify_log

    line = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert line["event"] == "train-lora" and line["trained_on"] == 1 and line["lora_sha256"].startswith("sha256:")
    assert line["skipped"][0]["file"] == "bad.png" and line["skipped"][0]["decision"]["allowed"] is False
    assert "xyzzy" not in json.dumps(line)  # verdicts, not caption text
    assert verify_log(tmp_path / "audit.jsonl").ok
    styled = api.load(config(klein_folders["base"], tmp_path, lora=[{"path": str(out)}]), host=lora_host)
    assert styled.stages.model.describe()["loras"][0]["layers"] == 10


def test_metadata_jsonl_and_its_errors(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    draw("red").save(data / "a.png")
    draw("blue").save(data / "b.png")
    lines = [{"file_name": "b.png", "text": "a blue square"}, {"file_name": "a.png", "text": "a red square"}]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert [(i.name, i.caption) for i in train_lora.read_dataset(data)] == [("a.png", "a red square"),
                                                                          ("b.png", "a blue square")]
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "text": "x"}) + "\n")
    with pytest.raises(TrainingError, match=r"metadata.jsonl:1: caption without an image .*c\.png"):
        train_lora.read_dataset(data)
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}) + "\n")
    with pytest.raises(TrainingError, match=r"metadata.jsonl:1: a.png: image without a caption"):
        train_lora.read_dataset(data)


def test_every_linear_layer_trains_single_blocks_output_included(klein_folders, lora_host, tmp_path):
    """The single blocks' output projection (diffusers' ``single_transformer_blocks.N.attn.to_out``), whose width
    the DiT reads from the layer itself, trains like any other target and the file loads back."""
    data = make_data(tmp_path / "data", colours=("green",))
    out = tmp_path / "out.safetensors"
    cfg = config(klein_folders["base"], tmp_path)
    train_lora.train(cfg, data, out, host=lora_host,
                     **{**OPTIONS, "steps": 2, "targets": ("to_out", "to_qkv_mlp_proj")})
    from safetensors.torch import load_file

    keys = load_file(out)
    assert any(k.startswith("transformer.single_transformer_blocks.") and ".attn.to_out.lora_A" in k for k in keys)
    styled = api.load(config(klein_folders["base"], tmp_path, lora=[{"path": str(out)}]), host=lora_host)
    assert styled.stages.model.describe()["loras"][0]["layers"] > 0
