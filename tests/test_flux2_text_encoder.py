"""FLUX.2 dev prompt encoder: parity with diffusers on a tiny random Mistral-3, and checkpoint-folder errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from fluxframe.errors import CheckpointError
from fluxframe.plugins.flux2.text_encoder import SYSTEM_MESSAGE, MistralPromptEncoder
from fluxframe.plugins.flux2.tiny import build_tiny_mistral3, build_tiny_tokenizer

PROMPTS = ["a red circle", "A lighthouse stands on rocky cliffs as stormy waves crash far below, at dusk, in oil paint."]
LONG_PROMPT = " ".join(["a silver bicycle leans against a brick wall covered with ivy"] * 80)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F"""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model gains nothing from threads, and on a busy machine intra-op threads slow it tenfold.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2_te")
    build_tiny_tokenizer(root / "tokenizer")
    build_tiny_mistral3(root / "text_encoder", vocab_size=vocab_size(root / "tokenizer"), seed=0)
    return root


def vocab_size(tokenizer_dir) -> int:
    return len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])


@pytest.fixture(scope="module")
def encoder(tiny):
    return MistralPromptEncoder.from_pretrained(
        tiny / "text_encoder", tiny / "tokenizer", dtype=torch.float32, device=torch.device("cpu")
    )


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def diffusers_embeds(encoder, prompts):
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        encoder.model, encoder.tokenizer, prompts, dtype=torch.float32, device="cpu"
    )


def test_system_message_matches_diffusers():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as reference

    assert SYSTEM_MESSAGE == reference


def test_shape_dtype_and_identity_fields(encoder):
    out = encoder.encode(PROMPTS)
    assert out.shape == (2, 512, encoder.embed_dim) and encoder.embed_dim == 3 * 32
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ident = encoder.identity
    assert ident["class"] == "Mistral3ForConditionalGeneration"
    assert (ident["hidden_size"], ident["num_hidden_layers"], ident["layers"]) == (32, 30, [10, 20, 30])
    assert len(ident["config_sha256"]) == 64
    assert encoder.to("cpu") is encoder


def test_parity_with_diffusers_batch(encoder):
    ours, ref = encoder.encode(PROMPTS), diffusers_embeds(encoder, PROMPTS)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-5
    assert not torch.allclose(ours[0], ours[1])


def test_parity_with_diffusers_truncated_prompt(encoder):
    ids = encoder.tokenizer(LONG_PROMPT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 512
    ours, ref = encoder.encode([LONG_PROMPT]), diffusers_embeds(encoder, [LONG_PROMPT])
    assert ours.shape == (1, 512, encoder.embed_dim)
    assert rel_err(ours, ref) < 1e-5


def test_img_placeholder_is_removed(encoder):
    assert torch.equal(encoder.encode(["a [IMG]cat"]), encoder.encode(["a cat"]))


def test_tiny_builders_are_deterministic(tiny, tmp_path):
    build_tiny_tokenizer(tmp_path / "tok")
    build_tiny_mistral3(tmp_path / "te", vocab_size=vocab_size(tmp_path / "tok"), seed=0)
    for rel in ("tokenizer/tokenizer.json", "tokenizer/chat_template.jinja", "text_encoder/model.safetensors"):
        new = tmp_path / rel.replace("tokenizer/", "tok/").replace("text_encoder/", "te/")
        assert hashlib.sha256(new.read_bytes()).digest() == hashlib.sha256((tiny / rel).read_bytes()).digest(), rel


# --- where the chat template lives ---------------------------------------------------------------------------------


def _load(tiny, tokenizer_dir):
    return MistralPromptEncoder.from_pretrained(
        tiny / "text_encoder", tokenizer_dir, dtype=torch.float32, device=torch.device("cpu")
    )


def test_template_from_chat_template_jinja(tiny, encoder):
    config = json.loads((tiny / "tokenizer" / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and (tiny / "tokenizer" / "chat_template.jinja").is_file()
    assert torch.equal(_load(tiny, tiny / "tokenizer").encode(PROMPTS), encoder.encode(PROMPTS))


def test_template_from_chat_template_json(tiny, tmp_path, encoder):
    tok = copy_dir(tiny / "tokenizer", tmp_path / "tokenizer")
    jinja = tok / "chat_template.jinja"
    (tok / "chat_template.json").write_text(json.dumps({"chat_template": jinja.read_text()}))
    jinja.unlink()
    assert torch.equal(_load(tiny, tok).encode(PROMPTS), encoder.encode(PROMPTS))


def test_processor_template_wins_over_tokenizer_config(tiny, tmp_path, encoder):
    # PixtralProcessor (what diffusers calls) reads chat_template.json and ignores tokenizer_config's template.
    tok = copy_dir(tiny / "tokenizer", tmp_path / "tokenizer")
    jinja = tok / "chat_template.jinja"
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tok / "chat_template.json").write_text(json.dumps({"chat_template": jinja.read_text()}))
    jinja.unlink()
    assert torch.equal(_load(tiny, tok).encode(PROMPTS), encoder.encode(PROMPTS))


def test_no_template_anywhere(tiny, tmp_path):
    tok = copy_dir(tiny / "tokenizer", tmp_path / "tokenizer")
    (tok / "chat_template.jinja").unlink()
    with pytest.raises(CheckpointError, match="chat template") as info:
        _load(tiny, tok)
    assert info.value.file == str(tok)


# --- text encoder folder errors ------------------------------------------------------------------------------------


def test_pickled_only_text_encoder(tiny, tmp_path):
    from safetensors.torch import load_file

    te = tmp_path / "text_encoder"
    te.mkdir()
    shutil.copy(tiny / "text_encoder" / "config.json", te / "config.json")
    torch.save(load_file(tiny / "text_encoder" / "model.safetensors"), te / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled") as info:
        MistralPromptEncoder.from_pretrained(te, tiny / "tokenizer", dtype=torch.float32, device=torch.device("cpu"))
    assert "pytorch_model.bin" in str(info.value) and info.value.file == str(te)


def test_missing_folder_and_config(tiny, tmp_path):
    with pytest.raises(CheckpointError) as info:
        MistralPromptEncoder.from_pretrained(
            tmp_path / "nope", tiny / "tokenizer", dtype=torch.float32, device=torch.device("cpu")
        )
    assert info.value.file == str(tmp_path / "nope")
    te = tmp_path / "text_encoder"
    te.mkdir()
    with pytest.raises(CheckpointError) as info:
        MistralPromptEncoder.from_pretrained(te, tiny / "tokenizer", dtype=torch.float32, device=torch.device("cpu"))
    assert info.value.file == str(te / "config.json")
    with pytest.raises(CheckpointError) as info:
        MistralPromptEncoder.from_pretrained(
            tiny / "text_encoder", tmp_path / "no_tokenizer", dtype=torch.float32, device=torch.device("cpu")
        )
    assert info.value.file == str(tmp_path / "no_tokenizer")


def test_truncated_weights(tiny, tmp_path):
    te = copy_dir(tiny / "text_encoder", tmp_path / "text_encoder")
    weights = te / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        MistralPromptEncoder.from_pretrained(te, tiny / "tokenizer", dtype=torch.float32, device=torch.device("cpu"))
    assert info.value.file == str(te)


def test_too_few_layers_in_config(tiny, tmp_path):
    te = copy_dir(tiny / "text_encoder", tmp_path / "text_encoder")
    config = json.loads((te / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 12
    (te / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_hidden_layers") as info:
        MistralPromptEncoder.from_pretrained(te, tiny / "tokenizer", dtype=torch.float32, device=torch.device("cpu"))
    assert info.value.file == str(te / "config.json") and info.value.key == "num_hidden_layers"


def test_too_few_layers_in_model(tiny, tmp_path):
    from transformers import AutoTokenizer, Mistral3ForConditionalGeneration

    build_tiny_mistral3(tmp_path / "te12", vocab_size=vocab_size(tiny / "tokenizer"), num_hidden_layers=12)
    model = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "te12", local_files_only=True)
    with pytest.raises(CheckpointError, match="num_hidden_layers") as info:
        MistralPromptEncoder(model, AutoTokenizer.from_pretrained(tiny / "tokenizer", local_files_only=True))
    assert info.value.file == str(tmp_path / "te12" / "config.json")


# --- identity ------------------------------------------------------------------------------------------------------


def test_identity_stable_across_loads_and_dtypes(tiny, encoder):
    again = MistralPromptEncoder.from_pretrained(
        tiny / "text_encoder", tiny / "tokenizer", dtype=torch.bfloat16, device=torch.device("cpu")
    )
    assert again.encode(["x"]).dtype == torch.bfloat16
    assert again.identity == encoder.identity


def test_identity_differs_for_another_config(tiny, tmp_path, encoder):
    te = copy_dir(tiny / "text_encoder", tmp_path / "text_encoder")
    config = json.loads((te / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5
    (te / "config.json").write_text(json.dumps(config))
    other = MistralPromptEncoder.from_pretrained(
        te, tiny / "tokenizer", dtype=torch.float32, device=torch.device("cpu")
    )
    assert other.identity["config_sha256"] != encoder.identity["config_sha256"]
    assert {k: v for k, v in other.identity.items() if k != "config_sha256"} == {
        k: v for k, v in encoder.identity.items() if k != "config_sha256"
    }


def test_padding_keys_trimmed_exactly(encoder):
    """The encoder's attention skips the padding keys past the batch's longest prompt (no query attends them):
    the embeddings equal those of plain sdpa over all 512 keys, for prompts of different lengths together."""
    from fluxframe.plugins.flux2.text_encoder import TRIMMED_SDPA, attended_keys

    config = encoder._text_config
    assert config._attn_implementation == TRIMMED_SDPA
    prompts = ["a red circle", PROMPTS[1], ""]
    batch = encoder.tokenizer.apply_chat_template(
        [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in prompts], tokenize=True,
        return_dict=True, return_tensors="pt", padding="max_length", max_length=512)
    assert attended_keys(batch["attention_mask"]) < 100  # something is trimmed
    trimmed = encoder.encode(prompts)
    config._attn_implementation = "sdpa"
    try:
        full = encoder.encode(prompts)
    finally:
        config._attn_implementation = TRIMMED_SDPA
    assert rel_err(trimmed, full) < 1e-6


def test_attended_keys():
    from fluxframe.plugins.flux2.text_encoder import attended_keys

    assert attended_keys(torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])) == 3  # right padding: the longest
    assert attended_keys(torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])) == 5  # left padding: nothing to trim
    assert attended_keys(torch.zeros(1, 4, dtype=torch.long)) == 4
