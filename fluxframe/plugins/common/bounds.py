"""Sane bounds on the sizes a model config claims (every built-in family's), checked before anything is built.

A config.json, or the header of a single-file checkpoint, is data from wherever the checkpoint came from. One
claiming 10^7 blocks or 10^6 autoencoder levels would otherwise spend minutes building modules (even on the meta
device) and then run out of memory, long before any weights are compared with it. The bounds sit far above every
real model (FLUX.2 dev: 8 + 48 blocks, hidden 6144, ~3.2e10 parameters; its Mistral text encoder: 40 layers,
hidden 5120, vocabulary 131072), so they refuse only configs no real checkpoint has. Every refusal is a
CheckpointError naming the file and the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fluxframe.errors import CheckpointError

MAX_BLOCKS = 1000  # transformer blocks, text encoder layers
MAX_WIDTH = 65536  # channels, hidden sizes, head dims, embedding widths
MAX_HEADS = 1024
MAX_FFN = 262144  # feed-forward widths, often 4x the hidden size
MAX_LEVELS = 16  # autoencoder levels: each halves the resolution, so 2^15 is already past any image
MAX_LAYERS_PER_BLOCK = 64
MAX_PATCH = 64
MAX_AXES = 16  # RoPE axes
MAX_MLP_RATIO = 64.0
MAX_VOCAB = 1 << 21
MAX_POSITIONS = 1 << 24
MAX_PARAMETERS = 10**12  # ~30x FLUX.2 dev's DiT
MAX_CONFIG_BYTES = 1 << 24  # a model's JSON files are kilobytes; parsing gigabytes of one would be the hang
_REFUSED = "; no real model comes near, so the config is refused before anything is built"

# Size keys of transformers text encoder configs (Mistral 3, Qwen3, T5, CLIP; nested text_config/vision_config
# too), with their bounds. Keys a config leaves out take transformers' defaults, which are sane.
TEXT_KEYS = {
    **dict.fromkeys(("num_hidden_layers", "num_layers", "num_decoder_layers"), MAX_BLOCKS),
    **dict.fromkeys(("hidden_size", "d_model", "d_kv", "head_dim", "projection_dim", "image_size", "patch_size",
                     "num_channels"), MAX_WIDTH),
    **dict.fromkeys(("num_attention_heads", "num_heads", "num_key_value_heads"), MAX_HEADS),
    **dict.fromkeys(("intermediate_size", "d_ff"), MAX_FFN),
    "vocab_size": MAX_VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
}


def read_json(path: Path) -> dict:
    """A model's JSON file (config.json, model_index.json ...) as a dict; CheckpointError naming it when it is
    missing, too large to be one, not valid JSON or not an object."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError("is missing", file=str(path)) from None
    except OSError as exc:
        raise CheckpointError(f"cannot be read: {exc}", file=str(path)) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"is over {MAX_CONFIG_BYTES} bytes: not a model config", file=str(path))
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"is not valid JSON: {exc}", file=str(path)) from None
    if not isinstance(data, dict):
        raise CheckpointError("must hold a JSON object", file=str(path))
    return data


def text_encoder_config(folder: Path) -> dict:
    """``folder``/config.json (a transformers text encoder's), checked by ``text_config`` before transformers
    reads it: its own config classes build per-layer lists, and its models every layer, from these numbers."""
    file = Path(folder) / "config.json"
    data = read_json(file)
    text_config(data, file=str(file))
    return data


def integer(value: object, *, file: str, key: str, maximum: int, minimum: int = 1) -> int:
    """``value`` if it is an integer (not a bool) from ``minimum`` to ``maximum``, else a CheckpointError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"expected an integer from {minimum} to {maximum}, got {short(value)}", file=file,
                              key=key)
    if not minimum <= value <= maximum:
        raise CheckpointError(f"{short(value)} is out of bounds (expected {minimum} to {maximum}){_REFUSED}",
                              file=file, key=key)
    return value


def integers(value: object, *, file: str, key: str, maximum: int, max_len: int, minimum: int = 1) -> tuple[int, ...]:
    """``value`` as a tuple if it is a list of 1 to ``max_len`` integers, each from ``minimum`` to ``maximum``."""
    if not isinstance(value, (list, tuple)) or not value:
        raise CheckpointError(f"expected a non-empty list of integers, got {short(value)}", file=file, key=key)
    if len(value) > max_len:
        raise CheckpointError(f"{len(value)} entries is out of bounds (at most {max_len}){_REFUSED}", file=file,
                              key=key)
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
            raise CheckpointError(f"entry {i} is {short(v)}: expected integers from {minimum} to {maximum}",
                                  file=file, key=key)
    return tuple(value)


def number(value: object, *, file: str, key: str, maximum: float = math.inf, below: bool = False) -> float:
    """``value`` if it is a finite number > 0 and <= ``maximum`` (< if ``below``), else a CheckpointError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or value > maximum or (below and value == maximum):
        limit = "" if maximum == math.inf else f" and {'below' if below else 'at most'} {maximum:g}"
        raise CheckpointError(f"expected a finite number above 0{limit}, got {short(value)}", file=file, key=key)
    return float(value)


def parameters(count: float, *, file: str, key: str, what: str) -> None:
    """Refuse a config whose sizes, each in bounds, together make an absurd number of parameters."""
    if count > MAX_PARAMETERS:
        raise CheckpointError(f"these sizes make a {what} of about {count:.1e} parameters, more than "
                              f"{MAX_PARAMETERS:.0e}{_REFUSED}", file=file, key=key)


def text_config(data: dict, *, file: str, prefix: str = "") -> None:
    """Check a transformers config.json (as read, before transformers builds anything from it): every size key
    present is a positive integer within TEXT_KEYS' bounds, in nested ``*_config`` sections too, and the layers
    and widths together stay under MAX_PARAMETERS."""
    for key, value in data.items():
        if key in TEXT_KEYS and value is not None:
            integer(value, file=file, key=prefix + key, maximum=TEXT_KEYS[key])
        elif key.endswith("_config") and isinstance(value, dict) and prefix.count(".") < 4:
            text_config(value, file=file, prefix=f"{prefix}{key}.")
    layers_key = next((k for k in ("num_hidden_layers", "num_layers") if data.get(k) is not None), None)
    width = data.get("hidden_size") or data.get("d_model")
    if layers_key is not None and width:
        ffn = data.get("intermediate_size") or data.get("d_ff") or 4 * width
        count = (data.get("vocab_size") or 0) * width + data[layers_key] * (4 * width * width + 3 * width * ffn)
        parameters(count, file=file, key=prefix + layers_key, what="text encoder")


def short(value: object) -> str:
    """``repr(value)`` cut to one short line: a config can hold a list of millions, errors must stay readable."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
