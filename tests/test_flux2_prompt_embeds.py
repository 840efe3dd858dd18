"""Split text encoding (`fluxframe encode` → `generate --prompt-embeds`) and prompt upsampling."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from fluxframe import api, hookimpl
from fluxframe.cli import main
from fluxframe.core import embeddings
from fluxframe.core.interfaces import Filter, Verdict
from fluxframe.errors import Blocked, CheckpointError, RequestError
from fluxframe.plugins.flux2.family import prompt_encoder_identity


class Words(Filter):
    """Blocks prompts containing "forbidden"; remembers what it was shown."""

    name = "words"
    targets = frozenset({"prompt", "negative_prompt"})
    seen: list = []

    def check_prompt(self, text, target):
        Words.seen.append((target, text))
        return Verdict(self.name, "1", "forbidden" not in text, target)


@pytest.fixture
def words_host(host):
    class Plugin:
        @hookimpl
        def register_filters(self, register):
            register("words", Words)

    host.add(Plugin(), name="words-plugin")
    Words.seen = []
    return host


def config(folder, safety=False, **sampler):
    data = {"model": {"path": str(folder), "dtype": "float32", "device": "cpu"},
            "sampler": {"width": 32, "height": 32, "steps": 2, **sampler}}
    if safety:
        data["safety"] = {"require": ["words"]}
    return api.parse_config(data)


def test_embeddings_file_gives_the_same_image_without_loading_the_text_encoder(klein_folders, words_host, tmp_path):
    cfg = config(klein_folders["base"], safety=True)
    path = api.encode(cfg, "a red circle", tmp_path / "emb.safetensors", negative_prompt="green", host=words_host)
    meta = embeddings.load(path, prompt_encoder_identity(klein_folders["base"]), 96)[1]
    assert meta["prompt"] == "a red circle" and meta["negative_prompt"] == "green"
    assert json.loads(meta["encoder"])["class"] == "Qwen3ForCausalLM" and len(meta["encoder_sha256"]) == 64

    pipeline = api.load(cfg, host=words_host)
    result = pipeline.generate(api.GenerationRequest(prompt_embeds=path, seed=2), write=False)
    assert pipeline.stages.model._text_encoder is None  # never loaded
    assert result.prompt == "a red circle"  # the stored text, also what the audit record hashes
    assert result.audit["prompt_sha256"] == hashlib.sha256(b"a red circle").hexdigest()
    assert result.audit["prompt_embeds_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ("prompt", "a red circle") in Words.seen and ("negative_prompt", "green") in Words.seen
    direct = pipeline.generate(api.GenerationRequest(prompt="a red circle", negative_prompt="green", seed=2),
                               write=False)
    assert torch.equal(direct.latents, result.latents)


def test_stored_prompt_is_filtered_and_missing_text_blocks(klein_folders, words_host, tmp_path):
    cfg = config(klein_folders["distilled"], safety=True)
    path = api.encode(cfg, "something forbidden", tmp_path / "bad.safetensors", host=words_host)
    pipeline = api.load(cfg, host=words_host)
    with pytest.raises(Blocked):
        pipeline.generate(api.GenerationRequest(prompt_embeds=path, seed=0), write=False)
    # a file without its prompt text cannot pass a required prompt filter
    tensors, meta = embeddings.load(path, prompt_encoder_identity(klein_folders["distilled"]), 96)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "notext.safetensors"), metadata={k: v for k, v in meta.items() if k != "prompt"})
    with pytest.raises(Blocked):
        pipeline.generate(api.GenerationRequest(prompt_embeds=tmp_path / "notext.safetensors", seed=0), write=False)


def test_embeddings_from_another_encoder_or_of_the_wrong_width_are_refused(klein_folders, diffusers_flux2_folder,
                                                                            host, tmp_path):
    dev = api.encode(config(diffusers_flux2_folder), "a red circle", tmp_path / "dev.safetensors", host=host)
    embeddings.load(dev, prompt_encoder_identity(diffusers_flux2_folder), 96)  # fine for the encoder that made it
    pipeline = api.load(config(klein_folders["distilled"]), host=host)
    with pytest.raises(CheckpointError, match="another text encoder") as info:
        pipeline.generate(api.GenerationRequest(prompt_embeds=dev), write=False)
    assert info.value.key == "encoder_sha256" and info.value.file == str(dev)

    identity = prompt_encoder_identity(klein_folders["distilled"])
    wide = embeddings.save(tmp_path / "wide.safetensors", identity, "x", torch.zeros(1, 512, 64))
    with pytest.raises(CheckpointError, match=r"\(1, L, 96\)") as info:
        pipeline.generate(api.GenerationRequest(prompt_embeds=wide), write=False)
    assert info.value.key == "prompt_embeds" and info.value.file == str(wide)

    # made for a distilled model (no negative embeddings), used where true CFG runs
    distilled = api.encode(config(klein_folders["distilled"]), "x", tmp_path / "d.safetensors", host=host)
    base = api.load(config(klein_folders["base"]), host=host)
    with pytest.raises(RequestError, match="negative_prompt_embeds") as info:
        base.generate(api.GenerationRequest(prompt_embeds=distilled), write=False)
    assert info.value.field == "prompt_embeds"
    with pytest.raises(RequestError) as info:
        api.encode(config(klein_folders["distilled"]), "x", tmp_path / "n.safetensors", negative_prompt="y", host=host)
    assert info.value.field == "negative_prompt"
    with pytest.raises(RequestError, match="not both"):
        pipeline.generate(api.GenerationRequest(prompt="x", prompt_embeds=distilled), write=False)


def test_cli_encode_then_generate(klein_folders, tmp_path, capsys):
    (tmp_path / "c.toml").write_text(
        f'[model]\npath = "{klein_folders["distilled"]}"\ndtype = "float32"\ndevice = "cpu"\n'
        '[sampler]\nwidth = 32\nheight = 32\nsteps = 1\n[output]\ndir = "out"\n')
    emb = tmp_path / "e.safetensors"
    assert main(["encode", "--config", str(tmp_path / "c.toml"), "--prompt", "a cat", "--output", str(emb)]) == 0
    assert main(["generate", "--config", str(tmp_path / "c.toml"), "--prompt-embeds", str(emb), "--seed", "1",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith(".png")
    assert main(["generate", "--config", str(tmp_path / "c.toml"), "--prompt-embeds", str(tmp_path / "no"),
                 "--no-progress"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_upsampling_rewrites_filters_and_records_the_prompt(diffusers_flux2_folder, words_host):
    from fluxframe.plugins.flux2.text_encoder import UPSAMPLING_SYSTEM_MESSAGE

    pipeline = api.load(config(diffusers_flux2_folder, safety=True), host=words_host)
    model = pipeline.stages.model
    model.upsample_max_tokens, model.upsample_temperature = 6, 0.0  # greedy: deterministic
    result = pipeline.generate(api.GenerationRequest(prompt="a cat", seed=1, upsample_prompt=True), write=False)

    encoder = model.text_encoder
    messages = [[{"role": "system", "content": [{"type": "text", "text": UPSAMPLING_SYSTEM_MESSAGE}]},
                 {"role": "user", "content": [{"type": "text", "text": "a cat"}]}]]
    inputs = encoder.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
    out = encoder.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = encoder.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert result.upsampled_prompt == expected and result.prompt == "a cat"
    assert ("upsampled_prompt", expected) in Words.seen  # the rewrite passed the prompt filter too
    again = pipeline.generate(api.GenerationRequest(prompt="a cat", seed=1, upsample_prompt=True), write=False)
    assert torch.equal(again.latents, result.latents)
    plain = pipeline.generate(api.GenerationRequest(prompt=expected, seed=1), write=False)
    assert torch.equal(plain.latents, result.latents)  # the rewritten prompt is what was encoded
