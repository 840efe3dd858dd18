"""Invisible pixel watermark: embed and detect a fixed bit message.

Methods: ``fluxframe-rs`` (the default: fluxframe's tiled spread-spectrum mark from 256 px per edge, whose
detector also undoes rotation and aspect changes — see ``fluxframe.provenance.lattice``), ``fluxframe-ss`` (its
predecessor from 512 px per edge, which survives re-encoding, crops and resizes but not rotation — see
``fluxframe.provenance.robust``; still read by ``verify``), invisible-watermark's ``dwtDct`` (the FLUX reference
code's, described below; still read by ``verify``), ``dwtDctSvd`` and ``rivaGan``.

The ``dwtDct`` method (as the FLUX reference code and Stable Diffusion's scripts use it) hides the bits in the
U (blue-difference chroma) channel: one level of a Haar wavelet transform, the approximation band cut into 4×4
blocks, and in each block the largest non-DC coefficient (by magnitude) moved onto a lattice of step 36 — a
quarter step into it for a 0, three quarters for a 1. Block ``n`` carries bit ``n mod len(message)``; the decoder
takes a majority vote per bit over all the blocks carrying it.

fluxframe computes that transform itself, vectorised with numpy (the library loops over the blocks in Python:
~110–165 ms per 1024² image against ~25 ms here), and its marks read back with the library's stock decoder,
``imwatermark.WatermarkDecoder("bits", n).decode(bgr_uint8, "dwtDct")`` (tested). On the way it fixes three
defects of the library's encoder, none of which changes what a decoder reads:

* it applies the change in RGB, rounded and clipped (the library lets out-of-range chroma wrap around on
  ``uint8`` input, or returns unclipped values on float input), leaving untouched pixels exactly as they were;
* it leaves the wavelet detail bands alone (the library swaps the horizontal and vertical bands);
* it moves each peak to the nearest lattice point that keeps it the block's largest coefficient, lowering the
  block's other coefficients when that is cheaper (the library moves the peak by up to 27, often below another
  coefficient, which the decoder then reads instead: 18–32 % of its blocks read wrong on natural photos, against
  under 1 % here).

The other methods of the library (``dwtDctSvd``, ``rivaGan``) go through the library itself.

Detection (``match``) tries every message it is given and reports the best agreement — the fraction of bits
equal to the message. Unmarked photos read 35–80 %, so a mark is claimed only at ``THRESHOLD`` (90 %: at least
44 of 48 bits); ``false_match_probability`` bounds the chance that an unmarked image matches (below 1e-7 for 48
bits). It also reads marks the FLUX reference code wrote (see ``match``).

Images under ``MIN_AREA`` pixels are refused by the library; ``embed`` does not mark them and says so in its
record (``applied: False`` with the reason), which the C2PA signer writes into the manifest.

A deployment that configures a watermark refuses requests whose output would be too small to carry one
(``WatermarkPostprocessor.check_size``, called before any model work): an unmarked output is released only where
``[provenance.watermark] allow_unmarked_small = true``, and its record then says so (``allowed_unmarked``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from fluxframe.core.interfaces import OutputContext, Postprocessor
from fluxframe.errors import ProvenanceError, RequestError
from fluxframe.provenance import lattice, robust

log = logging.getLogger(__name__)

#: Format version of fluxframe's mark, carried in its last two bytes.
MESSAGE_FORMAT_VERSION = 1
#: fluxframe's default message: ASCII "fxfr" followed by the 16-bit mark format version (1), 48 bits, MSB first.
FLUXFRAME_MESSAGE = "".join(f"{byte:08b}" for byte in b"fxfr" + MESSAGE_FORMAT_VERSION.to_bytes(2, "big"))
#: The FLUX reference code's message: 0b001010101111111010000111100111001111010100101110 written through
#: ``bin()``, which drops the two leading zeros, so these 46 bits are what its images carry.
FLUX_REFERENCE_MESSAGE = "1010101111111010000111100111001111010100101110"
#: Messages ``verify`` looks for when not told otherwise, by name.
KNOWN_MESSAGES: dict[str, str] = {"fluxframe": FLUXFRAME_MESSAGE, "flux-reference": FLUX_REFERENCE_MESSAGE}

ROBUST_METHOD = robust.METHOD
LATTICE_METHOD = lattice.METHOD
#: fluxframe's own tiled methods, read by ``_match_robust``: the module of each.
TILED = {LATTICE_METHOD: lattice, ROBUST_METHOD: robust}
METHODS = (LATTICE_METHOD, ROBUST_METHOD, "dwtDct", "dwtDctSvd", "rivaGan")
#: The method of the shipped configs and of WatermarkPostprocessor when none is named.
DEFAULT_METHOD = LATTICE_METHOD
#: The library refuses images with fewer pixels than this (the limit is on area, not on either edge).
MIN_AREA = 256 * 256
MIN_BITS, MAX_BITS = 8, 256
#: Fraction of bits that must agree before a mark is claimed.
THRESHOLD = 0.9

_SCALE = 36.0  # quantisation step of the library's dwtDct on the U channel
_BLOCK = 4
_HAAR = 0.7071067811865476  # PyWavelets' Haar filter tap, 1/sqrt(2)
_U_TO_G, _U_TO_B = np.float32(0.395), np.float32(2.032)
_PEAK_MARGIN = 4.0  # how far the marked coefficient stays above the rest of its block


def validate_message(bits: Any, method: str = "dwtDct", *, key: str = "provenance.watermark.message") -> str:
    """The message as a 0/1 string, or ProvenanceError naming ``key``."""
    if not isinstance(bits, str) or not bits or set(bits) - {"0", "1"}:
        raise ProvenanceError(f"{key}: the watermark message must be a string of 0 and 1 characters, got {bits!r}")
    if not MIN_BITS <= len(bits) <= MAX_BITS:
        raise ProvenanceError(f"{key}: the watermark message must have {MIN_BITS} to {MAX_BITS} bits, "
                              f"got {len(bits)}")
    ones = bits.count("1") / len(bits)
    if not 0.25 <= ones <= 0.75:
        raise ProvenanceError(f"{key}: the watermark message must be between 25 % and 75 % ones ({ones:.0%} here): "
                              "unmarked flat images decode to mostly zeros, so a lopsided message would match them")
    if method == "rivaGan" and len(bits) != 32:
        raise ProvenanceError(f"{key}: the rivaGan method carries exactly 32 bits, got {len(bits)}")
    if method in TILED:
        TILED[method].validate_message(bits, key=key)
    return bits


def validate_method(method: Any, *, key: str = "provenance.watermark.method") -> str:
    if method not in METHODS:
        raise ProvenanceError(f"{key}: unknown watermark method {method!r}; choose one of {', '.join(METHODS)}")
    return method


# --- the dwtDct transform, vectorised ------------------------------------------------------------------------
#
# One level of the Haar transform, as PyWavelets computes it: the approximation coefficient of each 2×2 pixel
# group is (a + b + c + d) / 2 (up to rounding), and the inverse spreads a change Δ of it as Δ / 2 onto each of
# the four pixels (the detail bands, which dwtDct leaves alone, need not be computed at all).


def _rgb(image) -> np.ndarray:
    """A PIL image → uint8 RGB array."""
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def _chroma(rgb: np.ndarray, floating: bool = False) -> np.ndarray:
    """The U plane as OpenCV computes it (8-bit: centred at 128; float32 pixel values: centred at 0.5)."""
    import cv2

    src = rgb.astype(np.float32) if floating else rgb
    return cv2.cvtColor(src, cv2.COLOR_RGB2YUV)[:, :, 1].astype(np.float64)


def _approx(u: np.ndarray) -> np.ndarray:
    """Haar approximation band of the plane cut to multiples of 4 (as the library cuts it), computed with the
    same floating-point operations as PyWavelets (columns, then rows, each pair times 1/sqrt(2)), so blocks
    sitting exactly on a decision boundary read the same as with the stock decoder."""
    rows, cols = u.shape[0] // 4 * 4, u.shape[1] // 4 * 4
    u = u[:rows, :cols]
    half = u[0::2] * _HAAR + u[1::2] * _HAAR
    return half[:, 0::2] * _HAAR + half[:, 1::2] * _HAAR


def _blocks(band: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The approximation band cut into 4×4 blocks, row-major: (n_blocks, 16), and the block grid."""
    rows, cols = band.shape[0] // _BLOCK, band.shape[1] // _BLOCK
    cut = band[: rows * _BLOCK, : cols * _BLOCK]
    blocks = cut.reshape(rows, _BLOCK, cols, _BLOCK).transpose(0, 2, 1, 3).reshape(rows * cols, _BLOCK * _BLOCK)
    return blocks, (rows, cols)


def _unblock(blocks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    rows, cols = grid
    return blocks.reshape(rows, cols, _BLOCK, _BLOCK).transpose(0, 2, 1, 3).reshape(rows * _BLOCK, cols * _BLOCK)


def _peak(blocks: np.ndarray) -> np.ndarray:
    """Index in each block of the largest non-DC coefficient by magnitude (first one on ties, as the library)."""
    return np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1


def _block_bits(u: np.ndarray) -> np.ndarray:
    """The bit each block of a chroma plane carries (0/1 per block), as the library's decoder reads them."""
    blocks, _ = _blocks(_approx(u))
    values = np.abs(blocks[np.arange(len(blocks)), _peak(blocks)])
    return (np.mod(values, _SCALE) > 0.5 * _SCALE).astype(np.float64)


def _means(block_bits: np.ndarray, length: int) -> np.ndarray:
    """Per message bit, the fraction of the blocks carrying it (block n carries bit n mod length) that read 1."""
    n = len(block_bits)
    position = np.arange(n) % length
    sums = np.bincount(position, weights=block_bits, minlength=length)
    counts = np.bincount(position, minlength=length)
    return np.divide(sums, counts, out=np.zeros(length), where=counts > 0)


def _hard(means: np.ndarray) -> str:
    """The library's decision: a bit is 1 when more than 127/255 of its blocks read 1."""
    return "".join("1" if m * 255 > 127 else "0" for m in means)


def _best_agreement(bits: str, means: np.ndarray) -> float:
    """Agreement of ``bits`` with ``means`` cut at the threshold that suits the image best.

    The library cuts at one half. Images whose chroma peaks are unstable read some 0-blocks as 1 (FLUX
    reference marks in warm-coloured images: 0-bits at 51–58 %, 1-bits at 100 %), which the fixed cut turns
    into noise while the bits stay perfectly separated. Trying every cut costs at most len(bits) + 1 times the
    false-match probability of one cut, which ``false_match_probability`` accounts for.
    """
    want = np.array([b == "1" for b in bits])
    cuts = np.concatenate(([-np.inf], np.sort(means)))
    decided = means[None, :] > cuts[:, None]
    return float((decided == want[None, :]).mean(axis=1).max())


def _embed_dwtdct(image, bits: str):
    from PIL import Image

    rgb = _rgb(image)
    # Decide on the 8-bit chroma plane every decoder reads.
    blocks, grid = _blocks(_approx(_chroma(rgb)))
    index = np.arange(len(blocks))
    peak = _peak(blocks)
    magnitude = np.abs(blocks)
    offset = 0.25 + 0.5 * np.array([int(b) for b in bits], dtype=np.float64)[index % len(bits)]
    # The peak goes to a point of the wanted bit's lattice ((k + offset) * 36), and the block's other
    # coefficients that would then come within _PEAK_MARGIN of it go down, or a decoder would read one of them
    # instead. Of the lattice points around the peak, take the one that changes the block least (the library
    # always takes the one in the peak's own step and leaves the others alone: it moves the peak by up to 27,
    # and 18-32 % of its blocks then read back wrong on natural photos).
    peak_mag = magnitude[index, peak]
    others = magnitude.copy()
    others[:, 0] = 0.0  # the DC coefficient is never a candidate for the peak
    others[index, peak] = 0.0
    nearest = np.rint(peak_mag / _SCALE - offset)
    best_cost = np.full(len(blocks), np.inf)
    best_target = np.zeros(len(blocks))
    for shift in (-1.0, 0.0, 1.0, 2.0):
        target = (np.maximum(nearest + shift, 0.0) + offset) * _SCALE
        lowered = np.maximum(others - (target - _PEAK_MARGIN)[:, None], 0.0)
        cost = (target - peak_mag) ** 2 + (lowered**2).sum(axis=1)
        better = cost < best_cost
        best_cost = np.where(better, cost, best_cost)
        best_target = np.where(better, target, best_target)
    new_mag = np.minimum(magnitude, np.maximum(best_target - _PEAK_MARGIN, 0.0)[:, None])
    new_mag[:, 0] = magnitude[:, 0]
    new_mag[index, peak] = best_target
    change = np.where(blocks >= 0, 1.0, -1.0) * new_mag - blocks
    # Inverse Haar: each of the four pixels of a coefficient moves by half its change. A change of U alone is,
    # in RGB (OpenCV's YUV → RGB: R = Y + 1.140 V, G = Y - 0.395 U - 0.581 V, B = Y + 2.032 U), a change of G
    # and B that leaves Y and V as they were; pixels the mark does not touch keep their exact values.
    spread = (np.repeat(np.repeat(_unblock(change, grid), 2, axis=0), 2, axis=1) / 2.0).astype(np.float32)
    out = rgb.astype(np.float32)
    rows, cols = spread.shape
    out[:rows, :cols, 1] -= _U_TO_G * spread
    out[:rows, :cols, 2] += _U_TO_B * spread
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return Image.fromarray(out.astype(np.uint8))


def _library_embed(image, bits: str, method: str):
    from PIL import Image

    try:
        from imwatermark import WatermarkEncoder
    except ImportError as exc:  # pragma: no cover - a dependency of fluxframe's provenance layer
        raise ProvenanceError(f"the invisible-watermark package is needed for method {method!r}: {exc}") from exc
    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", [int(b) for b in bits])
    if method == "rivaGan":
        WatermarkEncoder.loadModel()
    out = encoder.encode(np.ascontiguousarray(_rgb(image)[:, :, ::-1]), method)  # the library works on BGR
    out = np.clip(np.rint(np.asarray(out, dtype=np.float64)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(out[:, :, ::-1]))


# --- public API ----------------------------------------------------------------------------------------------


def embed(image, bits: str, method: str = "dwtDct") -> tuple[Any, dict]:
    """Mark ``image`` (PIL) with ``bits``. Returns (marked image, record).

    The record says what was done: ``{"applied", "method", "bits", "length", "reason"}``. Images too small
    for the method are returned unchanged with ``applied: False`` and the reason — never silently.
    """
    validate_method(method, key="method")
    validate_message(bits, method, key="bits")
    width, height = image.size
    record: dict[str, Any] = {"applied": False, "method": method, "bits": bits, "length": len(bits), "reason": None}
    if method in TILED:
        record["reason"] = TILED[method].too_small(width, height)
        if record["reason"]:
            return image, record
    elif width * height < MIN_AREA:
        record["reason"] = (f"image is {width}x{height} = {width * height} pixels, under the {MIN_AREA} pixels "
                            f"(256x256) the {method} watermark needs; no watermark embedded")
        return image, record
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    if method in TILED:
        from PIL import Image

        marked = Image.fromarray(TILED[method].embed_rgb(_rgb(image), bits))
    elif method == "dwtDct":
        marked = _embed_dwtdct(image, bits)
    else:
        marked = _library_embed(image, bits, method)
    if alpha is not None:
        marked.putalpha(alpha)
    record["applied"] = True
    return marked, record


def unmarked_reason(width: int, height: int, method: str) -> str | None:
    """Why the watermark postprocessor of ``method`` would leave a ``width`` x ``height`` image unmarked, or None
    when it gets a mark. ``fluxframe-ss`` has a minimum edge, but below it a ``dwtDct`` mark is embedded instead
    where that method's minimum area allows (see ``WatermarkPostprocessor.process_image``); the other methods
    have the library's minimum area."""
    area = width * height
    if method in TILED:
        if TILED[method].too_small(width, height) is None or area >= MIN_AREA:
            return None
        return (f"{width}x{height} is under the {method} watermark's minimum of {TILED[method].MIN_EDGE} pixels per "
                f"edge, and its {area} pixels are under the minimum of {MIN_AREA} pixels of the dwtDct mark it "
                "falls back to")
    if area >= MIN_AREA:
        return None
    return f"{width}x{height} = {area} pixels is under the {method} watermark's minimum of {MIN_AREA} pixels"


def _decode_means(image, lengths: set[int], method: str) -> dict[tuple[str, int], np.ndarray]:
    """Per (reading, length), the fraction of blocks reading 1 for each bit. ``dwtDct`` is read two ways:
    "standard" (the 8-bit colour space of fluxframe's, Stable Diffusion's and the stock decoder) and "float"
    (see ``match``). The library's other methods give hard bits (0.0 or 1.0)."""
    width, height = image.size
    if width * height < MIN_AREA:
        raise ProvenanceError(f"image is {width}x{height}, under the {MIN_AREA} pixels (256x256) the {method} "
                              "watermark needs; it cannot carry a readable mark")
    out: dict[tuple[str, int], np.ndarray] = {}
    if method == "dwtDct":
        rgb = _rgb(image)
        standard = _block_bits(_chroma(rgb))
        floating = _block_bits(_chroma(rgb, floating=True))
        for length in lengths:
            out[("standard", length)] = _means(standard, length)
            out[("float", length)] = _means(floating, length)
        return out
    from imwatermark import WatermarkDecoder

    if method == "rivaGan":
        WatermarkDecoder.loadModel()
    bgr = np.ascontiguousarray(_rgb(image)[:, :, ::-1])
    for length in lengths:
        bits = WatermarkDecoder("bits", length).decode(bgr, method)
        out[("standard", length)] = np.asarray(bits, dtype=bool).astype(np.float64)
    return out


def detect(image, bits_len: int, method: str = "dwtDct") -> str:
    """The ``bits_len`` bits ``image`` carries, decided as invisible-watermark's stock decoder decides them
    (``fluxframe-ss``: the error-corrected message, or the raw bits when the code does not decode)."""
    validate_method(method, key="method")
    if method in TILED:
        word = TILED[method].read(_rgb(image), {int(bits_len)})["words"].get(int(bits_len))
        if word is None:
            return "0" * int(bits_len)
        return word["message"] or "".join("1" if b else "0" for b in word["hard"][: int(bits_len)])
    return _hard(_decode_means(image, {int(bits_len)}, method)[("standard", int(bits_len))])


def agreement(a: str, b: str) -> float:
    """Fraction of equal bits of two equally long bit strings."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def false_match_probability(length: int, threshold: float = THRESHOLD, readings: int = 2) -> float:
    """Upper bound on the chance that an unmarked image matches one ``length``-bit message: the binomial
    tail of ``threshold`` agreement by chance, times the cuts and readings ``match`` tries."""
    need = math.ceil(threshold * length - 1e-9)
    tail = sum(math.comb(length, k) for k in range(need, length + 1)) / 2.0 ** length
    return min(1.0, tail * (length + 1) * readings)


def robust_false_match_probability(length: int) -> float:
    """Chance that the error-correcting decoder turns a random coded word into one given ``length``-bit message:
    the words within its correction radius of that message's codeword, over all words. The sync confidence
    threshold comes on top (unmarked images stay under it, see ``robust.CONFIDENCE_THRESHOLD``)."""
    code = robust._bch(length)
    n = length + code.ecc_bits
    return sum(math.comb(n, k) for k in range(code.t + 1)) / 2.0**n


def lattice_false_match_probability(length: int) -> float:
    """As ``robust_false_match_probability`` for ``fluxframe-rs``, whose soft decoder accepts a codeword up to
    ``lattice._CHASE`` bits beyond the code's correction radius from the word read, and which decodes up to
    ``lattice.READINGS`` words read on different lattices of a confident image (a union bound over them)."""
    code = robust._bch(length)
    n = length + code.ecc_bits
    return lattice.READINGS * sum(math.comb(n, k) for k in range(code.t + lattice._CHASE + 1)) / 2.0**n


def _match_robust(image, messages: dict[str, str], method: str = ROBUST_METHOD) -> dict:
    """``match`` for ``fluxframe-ss``: detected when the sync confidence reaches ``robust.CONFIDENCE_THRESHOLD``
    and the error-corrected message equals one of ``messages``. ``agreement`` is the fraction of the coded bits
    (message and check bits) read right before correction; ``decoded`` the message read, whether or not it is
    one of ``messages`` (None when the code does not decode); ``confidence`` the sync peak over its noise floor in
    standard deviations; ``bit_errors`` the bits the code corrected; ``scale`` (x, y) and, for ``fluxframe-rs``,
    ``rotation`` (degrees, counter-clockwise) the geometry the mark was found at. ``method`` picks the tiled
    method (``fluxframe-rs`` or ``fluxframe-ss``)."""
    module = TILED[method]
    result: dict[str, Any] = {"detected": False, "message": None, "agreement": None, "method": method,
                              "threshold": module.CONFIDENCE_THRESHOLD, "scores": {}, "stock_agreement": {},
                              "false_match_probability": None, "reason": None, "confidence": None,
                              "decoded": None, "bit_errors": None, "scale": None, "rotation": None}
    if not messages:
        result["reason"] = "no watermark messages to look for"
        return result
    read = module.read(_rgb(image), {len(bits) for bits in messages.values()})
    result.update(confidence=read["confidence"], scale=read["scale"], rotation=read.get("rotation"))
    if not read["words"]:
        width, height = image.size
        result["reason"] = f"image is {width}x{height}: too small to find a {method} mark's period"
        return result
    for name, bits in messages.items():
        word = read["words"][len(bits)]
        result["scores"][name] = float(np.mean(word["hard"] == (robust.encode_bits(bits) > 0.5)))
    best = max(result["scores"], key=lambda n: (read["words"][len(messages[n])]["message"] == messages[n],
                                                result["scores"][n]))
    word = read["words"][len(messages[best])]
    result.update(agreement=result["scores"][best], decoded=word["message"], bit_errors=word["errors"])
    if read["confidence"] < module.CONFIDENCE_THRESHOLD:
        result["reason"] = (f"no {method} mark: confidence {read['confidence']:.1f} is under the "
                            f"{module.CONFIDENCE_THRESHOLD} threshold")
        result["decoded"] = result["bit_errors"] = None
    elif word["message"] is None:
        result["reason"] = (f"a {method} sync pattern was found (confidence {read['confidence']:.1f}) but "
                            "its message does not decode: too damaged")
    elif word["message"] != messages[best]:
        result["reason"] = (f"a {method} mark was found, but its message {word['message']} is none of "
                            "those looked for")
    else:
        probability = (lattice_false_match_probability if method == LATTICE_METHOD
                       else robust_false_match_probability)(len(messages[best]))
        result.update(detected=True, message=best, false_match_probability=probability)
    return result


def match(image, messages: dict[str, str], method: str = "dwtDct", threshold: float = THRESHOLD) -> dict:
    """Which of ``messages`` (name → bits) the image carries.

    Returns ``{"detected", "message", "agreement", "method", "threshold", "scores": {name: agreement},
    "stock_agreement": {name: agreement}, "false_match_probability", "reason"}``. ``detected`` when the best
    message agrees on at least ``threshold`` of its bits; ``stock_agreement`` is what the library's own decoder
    gets. For ``dwtDct`` each message is also read in the colour space the FLUX reference encoder works in
    (float32 pixel values, where OpenCV centres chroma at 0.5 instead of 128: its marks line up with the
    quantisation grid only there — the stock decoder reads them inverted in part), and with the decision cut
    adapted to the image (see ``_best_agreement``); the best reading counts. Images too small to carry a mark
    give ``detected: False`` with a ``reason``. ``fluxframe-ss`` is read by ``_match_robust`` (its own
    ``threshold``, a sync confidence, and more fields); ``threshold`` here applies to the bit agreement of the
    other methods.
    """
    validate_method(method, key="method")
    for name, bits in messages.items():
        validate_message(bits, method, key=f"watermark message {name!r}")
    if method in TILED:
        return _match_robust(image, messages, method)
    result: dict[str, Any] = {"detected": False, "message": None, "agreement": None, "method": method,
                              "threshold": threshold, "scores": {}, "stock_agreement": {},
                              "false_match_probability": None, "reason": None}
    if not messages:
        result["reason"] = "no watermark messages to look for"
        return result
    try:
        decoded = _decode_means(image, {len(bits) for bits in messages.values()}, method)
    except ProvenanceError as exc:
        result["reason"] = str(exc)
        return result
    for name, bits in messages.items():
        readings = [means for (_, length), means in decoded.items() if length == len(bits)]
        result["scores"][name] = max(_best_agreement(bits, means) for means in readings)
        result["stock_agreement"][name] = agreement(bits, _hard(decoded[("standard", len(bits))]))
    best = max(result["scores"], key=lambda n: (result["scores"][n], len(messages[n])))
    result["agreement"] = result["scores"][best]
    if result["agreement"] >= threshold:
        result.update(detected=True, message=best,
                      false_match_probability=false_match_probability(len(messages[best]), threshold))
    else:
        result["reason"] = (f"no known mark: best agreement {result['agreement']:.0%} ({best}) is under the "
                            f"{threshold:.0%} threshold")
    return result


class WatermarkPostprocessor(Postprocessor):
    """Embeds the configured message in every output image and records what it did.

    ``process_image`` embeds, reads the mark back from the marked pixels, and stores the record in
    ``context.records["watermark"]``: ``{"applied", "method", "bits", "length", "reason", "readable",
    "readable_after_encoding", "agreement_after_encoding"}``. ``process_file`` then reads the mark from the
    encoded file when the format is lossy (JPEG, WebP) — JPEG with 4:2:0 chroma (PIL's default) or lossy WebP
    erase a dwtDct mark — so the record, which the C2PA signer writes into the manifest, never claims a mark
    that is not there. PNG is lossless: the file carries exactly the marked pixels.
    """

    name = "watermark"
    order = 100

    def __init__(self, method: str = DEFAULT_METHOD, message: str | None = None, *,
                 allow_unmarked_small: bool = False):
        self.method = validate_method(method)
        self.message = validate_message(FLUXFRAME_MESSAGE if message is None else message, self.method)
        if not isinstance(allow_unmarked_small, bool):
            raise ProvenanceError("provenance.watermark.allow_unmarked_small: must be true or false, got "
                                  f"{allow_unmarked_small!r}")
        self.allow_unmarked_small = allow_unmarked_small
        if self.method == "rivaGan":
            try:
                import onnxruntime  # noqa: F401
            except ImportError as exc:
                raise ProvenanceError("provenance.watermark.method: rivaGan needs the onnxruntime package") from exc

    def check_size(self, width: int, height: int) -> None:
        """Refuse (RequestError naming the shorter side) an output size this method cannot mark, unless the
        deployment allows unmarked small outputs: a deployment that configures a watermark releases no unmarked
        image it has not agreed to, and the refusal comes before any model work, not after it."""
        reason = unmarked_reason(width, height, self.method)
        if reason is None or self.allow_unmarked_small:
            return
        raise RequestError(f"{reason}; this deployment refuses unmarked outputs (set [provenance.watermark] "
                           "allow_unmarked_small = true to allow them, each then recorded as unmarked)",
                           field="height" if height < width else "width")

    def _check(self, image, method: str) -> dict:
        """Whether ``image`` carries this postprocessor's mark: ``{"detected", "agreement"}``."""
        if method != "dwtDct":
            return match(image, {"configured": self.message}, method)
        # Our own marks are read in the 8-bit colour space only (the float reading is for FLUX reference marks).
        means = _means(_block_bits(_chroma(_rgb(image))), len(self.message))
        score = _best_agreement(self.message, means)
        return {"detected": score >= THRESHOLD, "agreement": score}

    def process_image(self, image, context: OutputContext):
        marked, record = embed(image, self.message, self.method)
        if not record["applied"] and self.method in TILED:
            # Too small for the robust mark: a fragile dwtDct mark beats none where dwtDct's own minimum allows it.
            fallback, fallback_record = embed(image, self.message, "dwtDct")
            if fallback_record["applied"]:
                marked, record = fallback, fallback_record
                record["requested_method"] = self.method
                record["reason"] = (f"image is {image.size[0]}x{image.size[1]}, under the "
                                    f"{TILED[self.method].MIN_EDGE} pixels per edge {self.method} needs: marked with "
                                    "dwtDct instead, which verify reads but which does not survive lossy "
                                    "re-encoding, crops or resizes")
                log.warning("watermark: %s", record["reason"])
        if record["applied"]:
            found = self._check(marked, record["method"])
            record["readable"] = found["detected"]
            record["readable_after_encoding"] = found["detected"]
            record["agreement_after_encoding"] = found["agreement"]
            if not found["detected"]:
                log.warning("the %s watermark cannot be read back from this image (%.0f%% of bits); it is recorded "
                            "as unreadable", record["method"], 100 * (found["agreement"] or 0))
        else:
            # Said in the record itself (which the manifest carries), not only in a log: this output is unmarked,
            # and whether the deployment agreed to that (check_size refuses it otherwise; a caller that skipped
            # check_size gets False here).
            record["allowed_unmarked"] = self.allow_unmarked_small
            if self.allow_unmarked_small:
                record["reason"] += " (allowed: [provenance.watermark] allow_unmarked_small = true)"
            log.warning("watermark not embedded: %s", record["reason"])
        context.records["watermark"] = record
        return marked

    def process_file(self, path, media_type: str, context: OutputContext) -> None:
        record = context.records.get("watermark")
        if not record or not record.get("applied") or media_type == "image/png":
            return
        from PIL import Image

        try:
            with Image.open(path) as encoded:
                encoded.load()
                found = self._check(encoded, record["method"])
        except OSError as exc:
            raise ProvenanceError(f"{path}: cannot read the encoded image back to check its watermark: {exc}") from exc
        record["readable_after_encoding"] = found["detected"]
        record["agreement_after_encoding"] = found["agreement"]
        if record.get("readable") and not found["detected"]:
            advice = ("" if record["method"] in TILED else
                      "; use PNG, lossless WebP or JPEG with 4:4:4 chroma at quality >= 90, or the fluxframe-rs method")
            log.warning("the %s watermark does not survive this %s encoding (%.0f%% of bits read back)%s",
                        record["method"], media_type, 100 * (found["agreement"] or 0), advice)
