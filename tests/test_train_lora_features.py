"""``fluxframe train-lora``'s Flex.2 training (inpaint and control dropout, the channels drawn as generation fills
them, the guidance embedder bypassed), a quantised frozen base, gradient checkpointing over blocks, sample images
through the deployment's pipeline during training, and the errors of their options, on tiny random checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flex2_helpers import build_flux_folder
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from test_train_lora import KeywordPlugin, config, make_data, written

from fluxframe import api
from fluxframe.demo import train_lora
from fluxframe.errors import TrainingError

R = 32  # training resolution and output size: the tiny Flux.1 VAE halves it, 16×16 latents, 8×8 tokens


@pytest.fixture(scope="module")
def flex2_folder(tmp_path_factory):
    return build_flux_folder(tmp_path_factory.mktemp("flex2"), in_channels=196, class_name="Flex2Pipeline")


@pytest.fixture
def lora_host(host):
    host.add(KeywordPlugin(), name="keyword-plugin")
    return host


def flex2_config(folder, tmp_path, **extra):
    return api.parse_config({
        "model": {"family": "flex2", "path": str(folder), "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 2, "guidance": 3.5, "width": R, "height": R},
        "output": {"dir": str(tmp_path / "outputs")},
        "safety": {"filters": {"keyword": {}}},
        **extra,
    })


def discs(folder):
    """Two pictures with edges (a Canny line map that is not empty)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in (("red", (220, 30, 30)), ("blue", (40, 60, 220))):
        image = Image.new("RGB", (R, R), (245, 245, 245))
        ImageDraw.Draw(image).ellipse((6, 6, 26, 26), fill=colour)
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} disc, flat style")
    return folder


def test_flex2_trains_with_inpaint_and_control_dropout(flex2_folder, lora_host, tmp_path, monkeypatch):
    """The loss falls; the channels are what generation feeds (the control latent of the image's line map
    exactly as the control conditioner makes it, the inpaint latent and mask exactly as the inpaint conditioner
    makes them from the same mask), each empty part of the time; the guidance embedder is out of the training
    passes and back afterwards; the file loads back bit for bit and changes a generate with inpaint and control."""
    data = discs(tmp_path / "data")
    cfg = flex2_config(flex2_folder, tmp_path)
    drawn, masks, guidance_seen = [], [], []
    make_channels, make_masks = train_lora.Flex2Channels.__call__, train_lora.random_masks

    def spy_channels(self, x0, idx, generator):
        channels = make_channels(self, x0, idx, generator)
        drawn.append((idx.clone(), {k: v.clone() for k, v in channels.items()}))
        guidance_seen.append(self.model.transformer.guidance_in)
        return channels

    def spy_masks(n, size, generator):
        out = make_masks(n, size, generator)
        masks.append(out.clone())
        return out

    monkeypatch.setattr(train_lora.Flex2Channels, "__call__", spy_channels)
    monkeypatch.setattr(train_lora, "random_masks", spy_masks)
    forward_guidance = []
    from fluxframe.plugins.flex2.transformer import Flux1Transformer

    real_forward = Flux1Transformer.forward

    def spy_forward(self, img, *args, **kwargs):
        forward_guidance.append(self.guidance_in is None)
        return real_forward(self, img, *args, **kwargs)

    monkeypatch.setattr(Flux1Transformer, "forward", spy_forward)
    out = tmp_path / "flex.safetensors"
    train_lora.train(cfg, data, out, host=lora_host, rank=4, steps=8, lr=2e-2, batch_size=2, resolution=R,
                     seed=1, inpaint_dropout=0.4, control_dropout=0.4)
    monkeypatch.setattr(Flux1Transformer, "forward", real_forward)

    record = json.loads((tmp_path / "flex.training.json").read_text())
    assert record["probe_loss_end"] < 0.8 * record["probe_loss_start"]
    assert record["conditioning"] == {"inpaint_dropout": 0.4, "control_dropout": 0.4, "control_kinds": ["line"]}
    assert record["guidance_embedding"] == "bypassed" and all(forward_guidance)  # every training/probe pass
    assert record["targets"] == ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]

    # what generation feeds for the same image and mask: the transformer's input at its first step
    pipeline = api.load(cfg, host=lora_host)
    model = pipeline.stages.model
    captured = []
    model_input = model.model_input
    model.model_input = lambda latents, conditioning: captured.append(model_input(latents, conditioning)) \
        or captured[-1]
    names = sorted(p.name for p in data.glob("*.png"))
    counts = {"inpaint": [0, 0], "control": [0, 0]}  # [on, off]
    compared = 0
    for (idx, channels), batch_masks in zip(drawn, masks, strict=True):
        for row, item in enumerate(idx.tolist()):
            on = {"inpaint": bool(channels["mask"][row].min() < 1), "control": bool(channels["control"][row].any())}
            for name in on:
                counts[name][0 if on[name] else 1] += 1
            if not on["inpaint"]:
                assert not channels["inpaint"][row].any() and bool((channels["mask"][row] == 1).all())
            if not (on["inpaint"] and on["control"]) or compared >= 2:
                continue
            compared += 1  # both drawn: the conditioners' channels for the same image and mask
            image, mask = data / names[item], data.parent / "mask.png"
            Image.fromarray((batch_masks[row, 0].numpy() * 255).astype(np.uint8), "L").save(mask)
            captured.clear()
            pipeline.generate(api.GenerationRequest(prompt="x", seed=0, steps=1, conditioning={
                "inpaint": {"image": image, "mask": mask}, "control": {"image": image, "kind": "line"}}),
                write=False)
            ref = captured[0][0]
            assert torch.allclose(channels["inpaint"][row], ref[:, 64:128], atol=1e-5)
            assert torch.allclose(channels["mask"][row], ref[:, 128:132], atol=1e-6)
            assert torch.allclose(channels["control"][row], ref[:, 132:], atol=1e-5)
    assert compared == 2
    inpaint_on, inpaint_off = counts["inpaint"]
    control_on, control_off = counts["control"]
    assert min(inpaint_on, inpaint_off, control_on, control_off) >= 3  # 16 draws at 0.4 dropout: each way

    # read back bit for bit, and it changes an inpaint + control generation
    from fluxframe.plugins.lora import load_lora

    tensors = load_file(out)
    for layer in load_lora(out).layers:
        assert torch.equal(layer.down, tensors[f"transformer.{layer.name}.lora_A.weight"])
        assert torch.equal(layer.up, tensors[f"transformer.{layer.name}.lora_B.weight"])
    assert model.transformer.guidance_in is not None
    request = dict(prompt="a red disc, flat style", seed=3, conditioning={
        "inpaint": {"image": data / "red.png", "mask": data.parent / "mask.png"},
        "control": {"image": data / "blue.png", "kind": "line"}})
    del model.model_input
    plain = np.asarray(pipeline.generate(api.GenerationRequest(**request), write=False).image, np.int16)
    styled = api.load(flex2_config(flex2_folder, tmp_path, lora=[{"path": str(out)}]), host=lora_host)
    assert styled.stages.model.describe()["loras"][0]["layers"] == len(load_lora(out).layers) == 16
    mine = np.asarray(styled.generate(api.GenerationRequest(**request), write=False).image, np.int16)
    assert np.abs(mine - plain).max() > 2

    # diffusers' FluxTransformer2DModel reads the same file (PEFT) and predicts what fluxframe's DiT does with it
    from diffusers import FluxTransformer2DModel
    from flex2_helpers import rel_err

    from fluxframe.plugins.flex2.family import image_ids, text_ids

    ref = FluxTransformer2DModel.from_pretrained(flex2_folder / "transformer").eval()
    ref.load_lora_adapter(str(out), prefix="transformer")
    torch.manual_seed(1)
    img, txt, pooled = torch.randn(1, 15, 196), torch.randn(1, 7, 32), torch.randn(1, 32)
    t, g = torch.tensor([0.6]), torch.tensor([3.5])
    with torch.no_grad():
        theirs = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                     img_ids=image_ids(3, 5), txt_ids=text_ids(7), guidance=g, return_dict=False)[0]
        ours = styled.stages.model.transformer(img, image_ids(3, 5), txt, text_ids(7), pooled, t, g)
        base = model.transformer(img, image_ids(3, 5), txt, text_ids(7), pooled, t, g)
    assert rel_err(ours, theirs) < 1e-5 and rel_err(base, theirs) > 1e-3


def test_flex2_resumes_to_the_same_file(flex2_folder, lora_host, tmp_path):
    """The masks, dropouts and control kinds come from the checkpointed generator: an interrupted Flex.2 run ends
    in the very file an uninterrupted one writes."""
    data, cfg = discs(tmp_path / "data"), flex2_config(flex2_folder, tmp_path)
    options = dict(rank=2, steps=3, lr=1e-2, batch_size=2, resolution=R, seed=2, checkpoint_every=1)
    out = tmp_path / "a" / "s.safetensors"
    train_lora.train(cfg, data, out, host=lora_host, stop_after=1, **options)
    train_lora.train(cfg, data, out, host=lora_host, **options)
    straight = tmp_path / "b" / "s.safetensors"
    train_lora.train(cfg, data, straight, host=lora_host, **options)
    a, b = load_file(out), load_file(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantized_base_trains_and_writes_the_same_layout(diffusers_flux2_folder, lora_host, tmp_path, monkeypatch):
    from fluxframe.plugins.memory.quantize import QuantLinear

    bases = []
    attach = train_lora.attach

    def spy(model, layers, rank, alpha):
        loras = attach(model, layers, rank, alpha)
        bases.extend(type(wrapper.base) for _, _, wrapper in model._train_lora_wrapped)
        return loras

    monkeypatch.setattr(train_lora, "attach", spy)
    data = make_data(tmp_path / "data", colours=("red",))
    options = dict(rank=8, steps=10, lr=3e-2, batch_size=2, resolution=32, seed=3)
    quantized = tmp_path / "int8.safetensors"
    train_lora.train(config(diffusers_flux2_folder, tmp_path), data, quantized, host=lora_host, quantize="int8",
                     **options)
    assert bases and all(b is QuantLinear for b in bases)  # the LoRAs sit on the quantised layers
    record = json.loads((tmp_path / "int8.training.json").read_text())
    assert record["quantize"] == "int8"
    assert record["probe_loss_end"] < 0.97 * record["probe_loss_start"]  # 1.312 -> 1.262 (fixed seeds)
    plain = tmp_path / "plain.safetensors"
    train_lora.train(config(diffusers_flux2_folder, tmp_path), data, plain, host=lora_host,
                     **{**options, "steps": 1})
    ours, theirs = load_file(quantized), load_file(plain)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    assert all(v.dtype == torch.float32 for v in ours.values())
    # nf4 through the deployment's own [memory] quantize (no --quantize): trains, same layout
    nf4 = tmp_path / "nf4.safetensors"
    cfg = config(diffusers_flux2_folder, tmp_path, memory={"strategy": "quantize", "quantize": {"format": "nf4"}})
    train_lora.train(cfg, data, nf4, host=lora_host, **{**options, "steps": 2})
    assert json.loads((tmp_path / "nf4.training.json").read_text())["quantize"] == "nf4"
    assert load_file(nf4).keys() == theirs.keys()


def test_the_quantize_option_reaches_the_memory_strategy(diffusers_flux2_folder, tmp_path):
    cfg = config(diffusers_flux2_folder, tmp_path, memory={"strategy": "model-offload"})
    quantized, fmt = train_lora.with_quantize(cfg, "nf4")
    assert fmt == "nf4" and quantized.memory.names == ["quantize", "model-offload"]
    assert quantized.memory.options["quantize"] == {"format": "nf4"}
    assert train_lora.with_quantize(cfg, None) == (cfg, None)


@pytest.mark.parametrize("family", ["flux2", "flex2"])
def test_gradient_checkpointing_gives_the_same_gradients(diffusers_flux2_folder, flex2_folder, lora_host, tmp_path,
                                                         family):
    if family == "flux2":
        data, cfg = make_data(tmp_path / "data", colours=("red", "blue")), config(diffusers_flux2_folder, tmp_path)
    else:
        data, cfg = discs(tmp_path / "data"), flex2_config(flex2_folder, tmp_path)
    grads = {}
    for checkpointing in (False, True):
        def keep(loras, checkpointing=checkpointing):
            grads[checkpointing] = [p.grad.clone() for lora in loras for p in (lora.down, lora.up)]

        train_lora.train(cfg, data, tmp_path / f"{checkpointing}.safetensors", host=lora_host, rank=4, steps=1,
                         batch_size=2, resolution=32, seed=5, gradient_checkpointing=checkpointing,
                         after_backward=keep)
    plain, checkpointed = grads[False], grads[True]
    assert len(plain) == len(checkpointed) and any(g.abs().max() > 0 for g in plain)
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_samples_go_through_the_pipeline_and_leave_training_alone(diffusers_flux2_folder, lora_host, tmp_path):
    from fluxframe.core.audit import verify_log

    data = make_data(tmp_path / "data", colours=("red", "blue"))
    cfg = config(diffusers_flux2_folder, tmp_path, audit=True)
    options = dict(rank=4, steps=2, lr=5e-3, batch_size=2, resolution=32, seed=3, checkpoint_every=1)
    out = tmp_path / "run" / "style.safetensors"
    train_lora.train(cfg, data, out, host=lora_host, sample_every=1, sample_prompts=("a red square", "a blue one"),
                     **options)
    samples = out.parent / "style.samples"
    assert written(samples) == ["step-000001-0.png", "step-000001-1.png", "step-000001.safetensors",
                                "step-000002-0.png", "step-000002-1.png", "step-000002.safetensors"]
    assert written(out.parent) == ["style.safetensors", "style.samples", "style.training.json"]
    record = json.loads((out.parent / "style.training.json").read_text())
    assert record["samples"]["files"] == ["step-000001-0.png", "step-000001-1.png", "step-000002-0.png",
                                          "step-000002-1.png"]

    # audited like any output, naming the LoRA file it was drawn with
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    generated = [line for line in lines if line.get("output")]
    assert [line["output"]["path"] for line in generated] == [str(samples / f) for f in record["samples"]["files"]]
    from fluxframe.core.hashing import sha256_file

    assert generated[0]["loras"][0]["file"] == "step-000001.safetensors"
    assert generated[0]["loras"][0]["sha256"].endswith(sha256_file(samples / "step-000001.safetensors"))
    assert verify_log(tmp_path / "audit.jsonl").ok
    # the final samples are the LoRA's own: the final file equals the last snapshot
    final, snapshot = load_file(out), load_file(samples / "step-000002.safetensors")
    assert all(torch.equal(final[k], snapshot[k]) for k in final)
    # the same image as generate with that snapshot as a [[lora]] (side path, as the samples apply it)
    again = api.load(config(diffusers_flux2_folder, tmp_path / "again",
                            lora=[{"path": str(samples / "step-000001.safetensors"), "mode": "side"}]),
                     host=lora_host)
    image = again.generate(api.GenerationRequest(prompt="a red square", seed=3), write=False).image
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(samples / "step-000001-0.png").convert("RGB")))

    # and drawing samples changed nothing in training: the same file as a run without them
    plain = tmp_path / "plain" / "style.safetensors"
    train_lora.train(config(diffusers_flux2_folder, tmp_path), data, plain, host=lora_host, **options)
    other = load_file(plain)
    assert all(torch.equal(final[k], other[k]) for k in final)


def test_low_noise_draws_that_share_of_the_noise_levels_below_its_bound(diffusers_flux2_folder, lora_host, tmp_path,
                                                                        monkeypatch):
    """--low-noise 1: every training step's noise levels lie in (0, 0.6]; the record names the share; without it
    nothing is drawn differently (the same file as a run that never heard of the option)."""
    from fluxframe.demo import train as demo_train

    drawn = []
    emphasise = demo_train.emphasise_low_noise

    def spy(sigma, fraction, high, generator):
        out = emphasise(sigma, fraction, high, generator)
        drawn.append(out.clone())
        return out

    monkeypatch.setattr(demo_train, "emphasise_low_noise", spy)
    data = make_data(tmp_path / "data", colours=("red", "blue"))
    options = dict(rank=2, steps=3, batch_size=2, resolution=32, seed=4)
    low = tmp_path / "low.safetensors"
    train_lora.train(config(diffusers_flux2_folder, tmp_path), data, low, host=lora_host, low_noise=1.0, **options)
    assert len(drawn) == 3 and all(float(s.max()) <= 0.6 and float(s.min()) > 0 for s in drawn)
    record = json.loads((tmp_path / "low.training.json").read_text())
    assert record["low_noise"] == {"share": 1.0, "below": 0.6}
    drawn.clear()
    default, zero = tmp_path / "default.safetensors", tmp_path / "zero.safetensors"
    train_lora.train(config(diffusers_flux2_folder, tmp_path), data, default, host=lora_host, **options)
    train_lora.train(config(diffusers_flux2_folder, tmp_path), data, zero, host=lora_host, low_noise=0.0, **options)
    assert drawn == [] and json.loads((tmp_path / "default.training.json").read_text())["low_noise"] is None
    a, b, c = load_file(default), load_file(zero), load_file(low)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("family", ["flux2", "flex2"])
def test_caption_dropout_trains_that_share_on_the_empty_prompt(diffusers_flux2_folder, flex2_folder, lora_host,
                                                                tmp_path, family):
    """--caption-dropout 1: every item trains on the empty prompt, so the captions no longer matter (the same file
    from other captions); the record names the share; without it nothing is drawn differently."""
    def data(folder, caption):
        made = make_data(folder, colours=("red", "blue")) if family == "flux2" else discs(folder)
        for text in made.glob("*.txt"):
            text.write_text(caption(text.stem))
        return made

    cfg = config(diffusers_flux2_folder, tmp_path) if family == "flux2" else flex2_config(flex2_folder, tmp_path)
    options = dict(rank=2, steps=2, batch_size=2, resolution=32, seed=6)
    files = {}
    for name, caption, dropout in (("a", lambda c: f"a {c} square", 1.0), ("b", lambda c: f"{c}, flat style", 1.0),
                                   ("plain", lambda c: f"a {c} square", 0.0), ("default", lambda c: f"a {c} square",
                                                                               None)):
        extra = {} if dropout is None else {"caption_dropout": dropout}
        out = tmp_path / name / "style.safetensors"
        train_lora.train(cfg, data(tmp_path / f"data-{name}", caption), out, host=lora_host, **extra, **options)
        files[name] = load_file(out)
    a, b, plain, default = files["a"], files["b"], files["plain"], files["default"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # captions never seen
    assert all(torch.equal(plain[k], default[k]) for k in a) and not all(torch.equal(a[k], plain[k]) for k in a)
    assert json.loads((tmp_path / "a" / "style.training.json").read_text())["caption_dropout"] == 1.0
    assert json.loads((tmp_path / "default" / "style.training.json").read_text())["caption_dropout"] is None


def _bad_option(case, tmp_path, flux2, flex2):
    """(config, data, options, what the message must name)."""
    if case == "checkpointing with group-offload":
        cfg = config(flux2, tmp_path, memory={"strategy": "group-offload"})
        return cfg, make_data(tmp_path / "data", colours=("red",)), {"gradient_checkpointing": True}, \
            "--gradient-checkpointing"
    if case in ("no prompt", "no every", "quantize", "flex2 option on flux2", "blocked sample", "low noise",
                "caption dropout"):
        data, cfg = make_data(tmp_path / "data", colours=("red",)), config(flux2, tmp_path)
        options = {"no prompt": ({"sample_every": 2}, "--sample-every 2"),
                   "low noise": ({"low_noise": 1.5}, "--low-noise"),
                   "caption dropout": ({"caption_dropout": -0.1}, "--caption-dropout"),
                   "no every": ({"sample_prompts": ("a red square",)}, "--sample-prompt"),
                   "quantize": ({"quantize": "fp4"}, "--quantize"),
                   "flex2 option on flux2": ({"control_dropout": 0.2}, "--control-dropout"),
                   "blocked sample": ({"sample_every": 2, "sample_prompts": ("a forbidden square",)},
                                      "--sample-prompt")}[case]
        return cfg, data, *options
    data, cfg = discs(tmp_path / "data"), flex2_config(flex2, tmp_path)
    options = {"depth without estimator": ({"control_kinds": ("line", "depth")}, "--control-kinds depth"),
               "unknown kind": ({"control_kinds": ("edges",)}, "--control-kinds"),
               "dropout": ({"inpaint_dropout": 1.5}, "--inpaint-dropout")}[case]
    return cfg, data, *options


@pytest.mark.parametrize("case", ["no prompt", "no every", "quantize", "flex2 option on flux2", "blocked sample",
                                  "depth without estimator", "unknown kind", "dropout",
                                  "checkpointing with group-offload", "low noise", "caption dropout"])
def test_bad_options_are_one_line_naming_the_option_and_write_nothing(diffusers_flux2_folder, flex2_folder,
                                                                      lora_host, tmp_path, case):
    cfg, data, options, named = _bad_option(case, tmp_path, diffusers_flux2_folder, flex2_folder)
    out = tmp_path / "out" / "style.safetensors"
    out.parent.mkdir()
    with pytest.raises(TrainingError) as err:
        train_lora.train(cfg, data, out, host=lora_host, rank=2, steps=2, resolution=32, **options)
    message = str(err.value)
    assert named in message and "\n" not in message
    if case == "depth without estimator":
        assert str(cfg.source) in message or "control conditioner" in message
    assert written(out.parent) == []


def test_cli_takes_the_new_options(diffusers_flux2_folder, lora_host, tmp_path, capsys):
    """--help lists them, argparse refuses an unknown format, and a run passes them all through to train."""
    from fluxframe.cli import main

    data = make_data(tmp_path / "data", colours=("red",))
    cfg = tmp_path / "deploy.toml"
    cfg.write_text(f'[model]\nfamily = "flux2"\npath = "{diffusers_flux2_folder}"\ndtype = "float32"\n'
                   f'device = "cpu"\n\n[sampler]\nsteps = 2\nwidth = 32\nheight = 32\n\n'
                   f'[output]\ndir = "{tmp_path / "outputs"}"\n')
    out = tmp_path / "cli" / "style.safetensors"
    rc = main(["train-lora", "--config", str(cfg), "--data", str(data), "--out", str(out), "--rank", "2",
               "--steps", "1", "--resolution", "32", "--quantize", "int8", "--gradient-checkpointing",
               "--sample-every", "1", "--sample-prompt", "a red square", "--sample-prompt", "a blue square",
               "--targets", "to_q,to_k"], host=lora_host)
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out.parent / "style.training.json").read_text())
    assert record["quantize"] == "int8" and record["gradient_checkpointing"] is True
    assert record["targets"] == ["to_q", "to_k"] and record["samples"]["prompts"] == ["a red square", "a blue square"]
    assert written(out.parent / "style.samples") == ["step-000001-0.png", "step-000001-1.png",
                                                     "step-000001.safetensors"]
    with pytest.raises(SystemExit):
        main(["train-lora", "--help"], host=lora_host)
    text = capsys.readouterr().out
    for option in ("--quantize", "--gradient-checkpointing", "--sample-every", "--sample-prompt",
                   "--inpaint-dropout", "--control-dropout", "--control-kinds"):
        assert option in text
    with pytest.raises(SystemExit):
        main(["train-lora", "--config", "x.toml", "--data", "d", "--out", "o.safetensors", "--quantize", "fp4"],
             host=lora_host)
    assert "--quantize" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_gradients_through_a_quantized_layer_keep_no_weight_copy(fmt):
    """The backward pass through a frozen QuantLinear gives F.linear's input gradient with the dequantised
    weight, and what autograd saves for it is the input, not that weight."""
    from fluxframe.plugins.memory.quantize import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear(torch.nn.Linear(256, 512), fmt).requires_grad_(False)
    x = torch.randn(3, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    (y * torch.arange(512.0)).sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(ref_x, layer.weight, layer.bias) * torch.arange(512.0)).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert max(saved, default=0) < 512 * 256  # no full weight kept for the backward pass
