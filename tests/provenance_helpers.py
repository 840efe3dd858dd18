"""Helpers for testing provenance: output contexts, dev signers, and the edits an attacker or a platform makes
(change a pixel but keep the manifest, strip the manifest, re-encode), plus a FLUX-reference watermark.

Used by fluxframe's tests and benchmarks; handy for plugin authors who test against signed outputs.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import numpy as np


def output_context(prompt: str = "a lighthouse at dusk", *, verdicts: list | None = None,
                   model: dict[str, Any] | None = None, config=None):
    """An OutputContext as the runner builds it, for a tiny-preset config."""
    from fluxframe.core.config import parse_config
    from fluxframe.core.interfaces import OutputContext
    from fluxframe.core.types import GenerationRequest

    return OutputContext(
        request=GenerationRequest(prompt=prompt),
        model=model if model is not None else {"family": "flux2", "checkpoint": "sha256:0123456789abcdef"},
        config=config if config is not None else parse_config({"model": {"preset": "tiny"}}),
        verdicts=list(verdicts or []),
    )


def dev_signer(folder: Path, **options):
    """Dev certificates in ``folder`` and a C2PASigner using them. Returns (signer, paths)."""
    from fluxframe.provenance.certs import make_dev_certificates
    from fluxframe.provenance.signing import C2PASigner

    paths = make_dev_certificates(folder, force=True)
    return C2PASigner(paths["chain"], paths["key"], **options), paths


def write_output(image, path: Path, postprocessors: list, context) -> Path:
    """Run postprocessors on ``image`` and release it as the runner does (process_image, then encode and
    process_file in a private temporary folder, then into place; see fluxframe.core.output.release)."""
    from fluxframe.core.images import MEDIA_TYPES, PIL_FORMATS, SAVE_OPTIONS
    from fluxframe.core.output import format_of, release

    posts = sorted(postprocessors, key=lambda p: p.order)
    for post in posts:
        image = post.process_image(image, context)
    fmt = format_of(Path(path))

    def make(tmp: Path) -> None:
        image.save(tmp, format=PIL_FORMATS[fmt], **SAVE_OPTIONS[fmt])
        for post in posts:
            post.process_file(tmp, MEDIA_TYPES[fmt], context)

    release(make, Path(path), overwrite=True, record=lambda digest: None)
    return Path(path)


# --- edits ---------------------------------------------------------------------------------------------------


def _png_chunks(data: bytes):
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        yield pos, kind, pos + 12 + length
        pos += 12 + length


def _first_png_chunk(data: bytes, kind: bytes) -> int:
    return next(start for start, k, _ in _png_chunks(data) if k == kind)


def _jpeg_segments(data: bytes):
    pos = 2
    while pos < len(data):
        marker = data[pos:pos + 2]
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        yield pos, marker, pos + 2 + length
        if marker == b"\xff\xda":  # start of scan: entropy-coded data follows
            return
        pos += 2 + length


def _sos(data: bytes) -> int:
    return next(start for start, marker, _ in _jpeg_segments(data) if marker == b"\xff\xda")


def change_one_pixel(data: bytes, *, xy: tuple[int, int] = (10, 10)) -> bytes:
    """``data`` (a signed PNG or JPEG) with one pixel changed and the manifest left in place.

    The image is decoded, one pixel changed, and re-encoded the same way; the new image data replaces the old
    while every byte before it (header, manifest) stays.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format
        pixels = np.array(image.convert("RGB"))
    x, y = xy
    pixels[y, x] = 255 - pixels[y, x]
    buffer = io.BytesIO()
    if fmt == "PNG":
        Image.fromarray(pixels).save(buffer, format="PNG")
        new = buffer.getvalue()
        return data[:_first_png_chunk(data, b"IDAT")] + new[_first_png_chunk(new, b"IDAT"):]
    if fmt == "JPEG":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=100, subsampling=0)
        new = buffer.getvalue()
        return data[:_sos(data)] + new[_sos(new):]
    raise ValueError(f"change_one_pixel: PNG or JPEG only, not {fmt}")


def strip_manifest(data: bytes) -> bytes:
    """``data`` with its C2PA manifest removed and every other byte kept (PNG caBX chunks, JPEG APP11)."""
    if data.startswith(b"\x89PNG"):
        return data[:8] + b"".join(data[s:e] for s, kind, e in _png_chunks(data) if kind != b"caBX")
    if data.startswith(b"\xff\xd8"):
        sos = _sos(data)
        head = b"".join(data[s:e] for s, marker, e in _jpeg_segments(data) if marker != b"\xff\xeb" and s < sos)
        return data[:2] + head + data[sos:]
    raise ValueError("strip_manifest: PNG or JPEG only")


def reencode(data: bytes, fmt: str = "PNG", **options) -> bytes:
    """Decode and encode again, as a platform does (drops the manifest, keeps what the pixels carry)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=fmt, **options)
    return buffer.getvalue()


def flux_reference_embed(image, bits: str | None = None):
    """Watermark ``image`` exactly as the FLUX reference code does: invisible-watermark's encoder on float32
    BGR pixel values in [0, 255], clamped, then truncated to 8 bits when the image is saved."""
    from imwatermark import WatermarkEncoder
    from PIL import Image

    from fluxframe.provenance.watermark import FLUX_REFERENCE_MESSAGE

    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", [int(b) for b in (bits or FLUX_REFERENCE_MESSAGE)])
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1])
    out = encoder.encode(bgr, "dwtDct")
    return Image.fromarray(np.ascontiguousarray(np.floor(np.clip(out, 0, 255)).astype(np.uint8)[:, :, ::-1]))
