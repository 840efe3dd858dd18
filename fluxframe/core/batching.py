"""What ``Pipeline.generate_many`` needs to run several requests through the model as one batch: which requests may
share a batch, and their per-request text and conditioning tensors stacked along the batch dimension.

Every request still gets its own noise (``initial_noise`` per seed, concatenated), its own conditioners' tensors and
step hooks; only the model calls (text encoding, every DiT step, decoding) see the whole batch. Requests are
compatible when everything but those per-image tensors is the same: size, steps, guidance, the conditioners active,
and the layout (shapes, position ids) of their conditioning, so that the batch is exactly the requests side by side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fluxframe.core.types import Conditioning, TextConditioning


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def batch_key(run: Any, index: int, batched: bool) -> tuple:
    """Runs with equal keys can share a batch; ``index`` makes a run that cannot share one (a family that does
    not take batches, a tensor that is not one image's) a group of its own."""
    alone = ("alone", index)
    if not batched:
        return alone
    s, c = run.settings, run.conditioning
    tensors = [t for t, _ in c.extra_tokens] + list(c.channels.values())
    if any(t.shape[0] != 1 for t in tensors):
        return alone
    extra = tuple((_shape(t), i.cpu().numpy().tobytes()) for t, i in c.extra_tokens)
    channels = tuple(sorted((name, _shape(t)) for name, t in c.channels.items()))
    hooks = tuple(type(h).__qualname__ for h in c.step_hooks)
    if run.text is None:
        text: tuple = ("encode",)
    else:  # embeddings read from a file: stacked as they are, so their layout must match
        if run.text.embeds.shape[0] != 1:
            return alone
        neg = run.text.negative
        text = ("embeds", type(run.text).__qualname__, _shape(run.text.embeds),
                run.text.ids.cpu().numpy().tobytes(), None if neg is None else _shape(neg.embeds))
    return (s.width, s.height, s.steps, s.guidance, tuple(run.conditioners), extra, channels, hooks, text)


def stack_text(texts: list[TextConditioning]) -> TextConditioning:
    """Per-request text conditionings (batch 1 each) as one batch: every tensor field but ``ids`` (which the batch
    shares) concatenated along the batch dimension, ``negative`` stacked likewise; other fields from the first."""
    first = texts[0]
    values = {}
    for f in dataclasses.fields(first):
        items = [getattr(t, f.name) for t in texts]
        if f.name == "negative":
            values[f.name] = None if items[0] is None else stack_text(items)
        elif f.name != "ids" and isinstance(items[0], torch.Tensor):
            values[f.name] = torch.cat(items)
        else:
            values[f.name] = items[0]
    return type(first)(**values)


def encode_unique(model: Any, prompts: list[str]) -> TextConditioning:
    """``model.encode_prompts(prompts)``, each distinct text encoded once (a group under true guidance mostly shares
    the empty negative prompt): the rows are gathered back into the prompts' order, every tensor field but ``ids``."""
    unique = list(dict.fromkeys(prompts))
    text = model.encode_prompts(unique)
    if len(unique) == len(prompts):
        return text
    rows = [unique.index(p) for p in prompts]
    values = {}
    for f in dataclasses.fields(text):
        value = getattr(text, f.name)
        if f.name not in ("ids", "negative") and isinstance(value, torch.Tensor):
            value = value[torch.tensor(rows, device=value.device)]
        values[f.name] = value
    return type(text)(**values)


#: On a CPU a decoder's full-resolution activations outgrow the caches past about this many pixels a call, and a
#: batch then decodes slower per image than a few at a time (the demo model at 256², measured: ~65 ms an image one
#: or two at a time, 96 ms in one call of eight). A GPU decodes the whole batch in one call.
CPU_DECODE_PIXELS = 2 * 256 * 256


def decode_chunk(tokens: torch.Tensor, grid: tuple[int, int], pixel_multiple: int) -> int:
    """How many of a batch's latents (``tokens`` (B, h·w, C) on the model's device) to decode per call."""
    if tokens.device.type != "cpu":
        return tokens.shape[0]
    pixels = grid[0] * grid[1] * pixel_multiple ** 2
    return max(1, CPU_DECODE_PIXELS // pixels)


def stack_conditioning(items: list[Conditioning]) -> Conditioning:
    """The conditionings of the requests of one batch (batch 1 each, same layout: see ``batch_key``) as one: extra
    tokens and channel groups concatenated along the batch dimension. Step hooks are left out: the runner calls
    each request's own on its own conditioning before each step, then stacks again."""
    first = items[0]
    extra = [(torch.cat([c.extra_tokens[k][0] for c in items]), ids) for k, (_, ids) in enumerate(first.extra_tokens)]
    channels = {name: torch.cat([c.channels[name] for c in items]) for name in first.channels}
    return Conditioning(extra_tokens=extra, channels=channels)
