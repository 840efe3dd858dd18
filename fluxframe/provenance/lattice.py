"""The ``fluxframe-rs`` watermark: ``fluxframe-ss``'s tiled spread-spectrum design with a tile small enough for
256-pixel images, and a detector that recovers the tile's full lattice — rotation, scale in x and y (an aspect
change) — from the autocorrelation before it reads the message.

* **The tile.** A 64×64-pixel tile is a 16×16 grid of 4×4-pixel chips, each +1 or -1, smoothed cyclically
  (σ = 1 px). A fixed, pseudo-random quarter of the chips is the synchronisation pattern; the other 192 carry
  the message, BCH-coded (``fluxframe.provenance.robust``'s code: for 48 bits, 77 check bits and up to 12 bit
  errors corrected), each coded bit on one or two chips multiplied by a pseudo-random ±1 sequence. The tile
  repeats over the whole image, at k times its size where the shorter edge is about k·512 px (1024² carries a
  128-px tile), so that detection can work on a k-times smaller copy and a platform's downscale keeps it.
* **Embedding.** As ``fluxframe-ss``, with an amplitude following local activity, scaled so that the PSNR
  against the unmarked image lies between ``PSNR_TARGET`` and ``PSNR_FLAT``; but added along the luma weights
  (R, G, B in proportion to their share of luma), which buys 1.34 times the luma change of a grey change for the
  same squared error. And **informed**: the embedder knows the image, so it reads its own mark back the way the
  detector will (same whitening, fold and matched filter, on the lattice it embedded, from the luma plus the
  change) and re-weights the chips — more amplitude on the coded bits the image works against, less on those it
  helps, at the same energy, and the sync chips raised until the sync confidence reaches ``_SYNC_TARGET`` — three
  rounds (``embed_rgb``, ``_allocate``). The detector does not know or need the weights: marks made before read
  as they did.
* **Detection.** The luminance (reduced k times on large images) is whitened; its autocorrelation has a peak on
  every point of the lattice the two tile edges span, however the image was rotated, resized or stretched. A
  search over the lattice's period, angle (±``MAX_ANGLE``°) and aspect, then a refinement of both basis vectors
  coordinate by coordinate, gives candidate lattices, after the lattice as embedded and the same period at the
  autocorrelation's best angle (tried first, unrefined: re-encoding, crops and colour changes leave the first, a
  rotation the second); for each the residual is resampled into the tile's own frame
  (one affine warp undoes rotation, scale and aspect at once), folded modulo 64 (averaging every copy of the
  tile; a crop only removes some, rotated-in corners count as missing) and cross-correlated with the sync pattern
  by FFT, which gives the translation; the best lattice is polished on the sync peak. The sync peak over the
  correlation's noise in standard deviations is the **confidence**; the chips are then read by matched filtering
  and decoded with the soft values (Chase decoding through the BCH decoder, see ``_decode``). Where the
  confidence reaches the threshold but the word does not decode, it is read again on the lattice before the
  polish, then on the lattice refitted on all the chips (``_refit``: sync and message, at a sub-pixel offset),
  ``READINGS`` words at most. The estimated rotation (degrees, counter-clockwise as PIL's ``rotate``) and scale
  (x, y) come with the message.

A mark is claimed only at ``CONFIDENCE_THRESHOLD`` and a decode within the code's correction radius plus the
``_CHASE`` flipped bits (see ``robust.decode_word``). Dense fine textures (gravel, grass, brick) at 256² do not hold
a readable mark at PSNR 39 dB, nor do some textured photos (astronaut, immunohistochemistry) at 256². Images with
either edge under ``MIN_EDGE`` are not marked. Rotation beyond ``MAX_ANGLE``, downscaling that leaves the chips
under ~2 px (a 256² image resized to half) and regeneration are outside what it reliably survives
(bench/watermark_grid.py measures it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fluxframe.errors import ProvenanceError
from fluxframe.provenance.robust import (
    ChipPattern,
    _bch,
    _blur,
    _gauss_transfer,
    _lattice_score,
    _smoother,
    decode_word,
    encode_bits,
)
from fluxframe.provenance.robust import validate_message as robust_validate_message

METHOD = "fluxframe-rs"
TILE = 64
CHIP = 4
GRID = TILE // CHIP
SYNC_CHIPS = GRID * GRID // 4
#: Smallest edge the method marks.
MIN_EDGE = 256
#: PSNR of textured images (their mark is scaled down to it). Issue 26 allows at least 38 dB and 40 on average; at
#: 39 (40 before) its matrix reads 435/458/513/516 of 520 instead of 402/446/509/504 (docs/provenance.md). Images
#: whose mark stays under this bound (flat ones, raised to PSNR_FLAT) are marked exactly as before.
PSNR_TARGET = 39.0
PSNR_FLAT = 44.0
#: Sync-peak confidence (standard deviations over the correlation's noise floor) from which a mark is claimed.
CONFIDENCE_THRESHOLD = 7.0
#: Largest rotation searched, in degrees either way.
MAX_ANGLE = 12.0

_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
_SEED = 0x66787273  # "fxrs"
_SMOOTH = 1.0
_AMP_FLAT, _AMP_MAX, _AMP_GAIN = 0.5, 5.0, 0.6
_LAG_MIN = 24.0  # shortest tile period searched, pixels of the working image
_WORK_EDGE = 512  # tile scale and working-copy reduction: the shorter edge over this, rounded
_LONG_PERIOD = 96  # a lattice found longer than this (working pixels) is searched again on a 2x smaller copy
_CANDIDATES = 5
_ASPECTS = (0.9, 1.0, 1.11)  # y period over x period, searched coarsely
_REACH = 2  # the coarse search counts lattice points up to this many periods along each basis vector
_REACH_FINE = 4  # ... and the refinement up to this many
_SURE = 9.0  # a lattice this confident ends the search (marked images saturate at 10-12)
_POLISH = 4.5  # a best lattice under this sync confidence is not polished (nothing to polish)
_PRIOR_STEP = 0.25  # angle step, in degrees, of the search for the lattice as embedded, rotated (see ``_priors``)
_CHASE = 5  # least reliable bits flipped in every combination by the soft decoder
# The all-chip refit (``_refit``), tried only where a confident lattice's word does not decode:
_REFIT_STEPS = (0.004, 0.002, 0.001)  # basis steps, as fractions of the period, coarse to fine
_REFIT_ROUNDS = 1  # sweeps over the four coordinates per step at most (3 read the same totals, at up to 3x the cost)
#: Readings of the coded word that may be decoded per image and message length: the sync-polished lattice's, the
#: lattice's before that polish, the all-chip refit's (see ``read``).
READINGS = 3
# Informed embedding (see ``embed_rgb``):
_ROUNDS = 3  # closed-loop rounds: mark, read back at the known lattice, re-weight (0: the uninformed mark)
_GAIN_MIN, _GAIN_MAX = 0.4, 3.0  # a coded bit's chip amplitude, relative to the uninformed mark's
_MARGIN = 0.5  # least margin sought on every coded bit, in one chip's response at amplitude 1 (see _allocate)
_RAISE_MAX = 1.5  # bits the image helps are raised up to this where the correlation constraint needs it
_ENOUGH = 1.0  # margin beyond which the energy left is spread evenly rather than on the least margins
_GIVE_UP = 10  # at most this many coded bits left to the BCH code where the energy does not reach _MARGIN on all
_SYNC_TARGET = 9.0  # sync confidence sought on the read at the known lattice (claimed from CONFIDENCE_THRESHOLD)
_SYNC_GAIN_MAX = 1.6  # the sync chips' amplitude, relative to the uninformed mark's, is raised up to this


def validate_message(bits: str, *, key: str) -> str:
    return robust_validate_message(bits, key=key, method=METHOD)


def too_small(width: int, height: int) -> str | None:
    """Why an image of this size is not marked, or None when it is large enough."""
    if min(width, height) >= MIN_EDGE:
        return None
    return (f"image is {width}x{height}, under the {MIN_EDGE} pixels per edge the {METHOD} watermark needs; "
            "no watermark embedded")


def tile_scale(width: int, height: int) -> int:
    """The factor the tile is enlarged by on an image of this size."""
    return max(1, round(min(width, height) / _WORK_EDGE))


# --- the tile ---------------------------------------------------------------------------------------------------


PATTERN = ChipPattern(TILE, CHIP, _SEED, _SMOOTH)


# --- embedding --------------------------------------------------------------------------------------------------


def _read_at_origin(luma: np.ndarray, length: int) -> tuple[np.ndarray, float]:
    """What ``read`` takes from the luminance of an image marked at its own size and not changed since — the soft
    values of the coded bits and the sync confidence — on the lattice known (the tile's own, at offset 0) instead
    of searched."""
    import cv2

    height, width = luma.shape
    shrink = tile_scale(width, height)  # as ``read``: the tile comes back to its base size
    if shrink > 1:
        luma = cv2.resize(luma, (width // shrink, height // shrink), interpolation=cv2.INTER_AREA)
    folded, _ = _fold(_whiten(luma), np.array([TILE, 0.0]), np.array([0.0, TILE]))
    return PATTERN.soft_words(folded, (0, 0), {length})[length], PATTERN.sync_confidence(folded, (0, 0))


def embed_rgb(rgb: np.ndarray, bits: str) -> np.ndarray:
    """``rgb`` (uint8 H×W×3) marked with ``bits``; the caller checks the size first (``too_small``).

    Informed: the uninformed mark (every chip at amplitude 1) is read back the way ``read`` reads it, on the
    lattice known; what the image itself puts on each coded bit (its interference) is that reading less the
    mark's own response, and the chip amplitudes are re-weighted (``_allocate``) so that the bits the image works
    against get more of the same energy and those it helps get less; the sync chips are raised until the sync
    confidence reaches ``_SYNC_TARGET``. Then again from the new mark, ``_ROUNDS`` times in all. The PSNR bounds
    apply to every round's mark as to the uninformed one."""
    import cv2

    height, width = rgb.shape[:2]
    if min(height, width) < MIN_EDGE:
        raise ProvenanceError(too_small(width, height))
    word = encode_bits(bits)
    scale = tile_scale(width, height)
    luma = cv2.cvtColor(rgb.astype(np.float32), cv2.COLOR_RGB2GRAY)
    detail = luma - _blur(luma, 1.5)
    activity = np.sqrt(_blur(detail * detail, 4.0))
    amplitude = np.clip(_AMP_FLAT + _AMP_GAIN * activity, _AMP_FLAT, _AMP_MAX)
    # Along the luma weights (R, G, B in proportion to their share of luma): the change of luma each unit of
    # squared error buys is the largest (1.34 times a grey change, +1.3 dB at the same PSNR); what it adds to
    # chroma is fine-grained, where the eye resolves colour least.
    direction = (_LUMA_WEIGHTS / float(_LUMA_WEIGHTS @ _LUMA_WEIGHTS)).astype(np.float32)
    limit, floor = (255.0 / 10 ** (target / 20) for target in (PSNR_TARGET, PSNR_FLAT))

    def change(gains: np.ndarray | None, sync_gain: float) -> np.ndarray:
        """The luma change of a mark with these chip amplitudes, within the PSNR bounds."""
        tile = PATTERN.tile(PATTERN.chips(word, gains, sync_gain), scale)
        tile /= np.sqrt(np.mean(tile**2))
        size = tile.shape[0]
        pattern = np.tile(tile, (-(-height // size), -(-width // size)))[:height, :width].astype(np.float32)
        delta = amplitude * pattern
        rms = float(np.sqrt(np.mean(delta.astype(np.float64) ** 2) * float(np.mean(direction**2))))
        if rms > limit or rms < floor:
            delta *= (limit if rms > limit else floor) / max(rms, 1e-6)
        return delta

    def mark(delta: np.ndarray) -> np.ndarray:
        out = rgb.astype(np.float32) + delta[..., None] * direction
        np.rint(out, out=out)
        np.clip(out, 0, 255, out=out)
        return out.astype(np.uint8)

    delta = change(None, 1.0)
    if _ROUNDS == 0:
        return mark(delta)
    sign = 2.0 * word - 1.0
    chips = np.bincount(np.arange(len(PATTERN.message)) % len(word), minlength=len(word)).astype(np.float64)
    # The tile is normalised to the same rms whatever the amplitudes, so the sum of squared chip amplitudes is
    # the budget: what the sync chips take above 1 the message chips give up.
    energy = float(len(PATTERN.message) + len(PATTERN.sync))
    host_soft, host_sync = _read_at_origin(luma, len(bits))
    host = host_soft * sign
    gains, sync_gain = np.ones(len(word)), 1.0
    for _ in range(_ROUNDS):
        # The marked image's luma is the image's plus the change (the direction's luma is 1), but for rounding
        # to integers and clipping at 0 and 255: near enough to weigh the chips by, without building the image.
        soft, sync = _read_at_origin(luma + delta, len(bits))
        margin = soft * sign
        used = gains * chips
        # The detector's response to one chip at amplitude 1, from what the mark added to the unmarked reading
        # (one figure for all bits: every chip is averaged over every copy of the tile).
        response = float(np.sum(margin - host) / np.sum(used))
        if response <= 0:
            break
        # The confidence grows about linearly with the sync chips' amplitude (the noise floor is the image's).
        slope = (sync - host_sync) / sync_gain
        if slope > 0:
            sync_gain = float(np.clip((_SYNC_TARGET - host_sync) / slope, 1.0, _SYNC_GAIN_MAX))
        need = (margin - response * used) / (response * chips)  # the image's part, in chip responses
        gains = _allocate(need, chips, energy - len(PATTERN.sync) * sync_gain**2)
        delta = change(gains, sync_gain)
    return mark(delta)


def _allocate(need: np.ndarray, chips: np.ndarray, energy: float) -> np.ndarray:
    """The chip amplitudes of the coded bits: bit b, spread on ``chips[b]`` chips at amplitude g[b], reads
    ``chips[b] · (need[b] + g[b])`` chip responses (``need``: what the image — and, through the whitening, the
    rest of the mark — put on it, negative where they work against the bit). Its margin over its noise (which
    grows as √chips) is ``(need[b] + g[b]) · √chips[b]``.

    The least margin over the bits is maximised within the energy (Σ chips · g²), each g in [``_GAIN_MIN``,
    ``_GAIN_MAX``]. Bits that would need more than ``_GAIN_MAX`` to reach ``_MARGIN``, and where the energy does
    not bring every bit to ``_MARGIN`` the dearest ones (up to ``_GIVE_UP`` in all), stay at ``_GAIN_MIN`` for
    the BCH code to correct. Where every bit can have ``_ENOUGH``, the energy left raises a floor under all the
    amplitudes instead (the uninformed mark's even amplitudes, with only the bits the image works against above
    it: equal margins would spend it on peaks, visible on flat images). And the mark's correlation with the
    image, Σ chips · g · need, is kept at least where the uninformed mark (g = 1) had it: the lattice search
    reads the autocorrelation of the whitened image, whose peaks are the mark's energy plus twice that
    correlation — a mark that only fought the image would cancel its own peaks. Where it would fall short, the
    bits the image helps are raised in proportion to the help, up to ``_RAISE_MAX`` (the least energy that
    restores it, without peaks)."""
    root = np.sqrt(chips)
    correlation = float(np.sum(chips * need))

    def spend(target: float, given_up: np.ndarray, floor: float = _GAIN_MIN) -> np.ndarray:
        low = np.maximum(target / root - need, floor)
        low[given_up] = _GAIN_MIN
        short = correlation - float(np.sum(chips * low * need))
        if short <= 0:
            return low
        # Raise the bits the image helps to μ·need (capped at _RAISE_MAX), μ the least that makes up the
        # shortfall: what they add is piecewise linear and increasing in μ, so it is evaluated at every breakpoint
        # and interpolated between the two around the shortfall.
        helped = need > 0
        h_need, h_low, h_chips = need[helped], low[helped], chips[helped]
        top_all = np.maximum(low, _RAISE_MAX)
        top = top_all[helped]
        breaks = np.unique(np.concatenate([h_low / h_need, top / h_need]))
        added = np.sum(h_chips * h_need * (np.clip(breaks[:, None] * h_need, h_low, top) - h_low), axis=1)
        k = int(np.searchsorted(added, short))
        if k >= len(breaks):
            mu = breaks[-1]  # every helped bit at _RAISE_MAX: as far as it goes
        elif k == 0:
            mu = breaks[0]
        else:
            mu = breaks[k - 1] + (short - added[k - 1]) / (added[k] - added[k - 1]) * (breaks[k] - breaks[k - 1])
        return np.where(helped, np.clip(mu * need, low, top_all), low)

    required = _MARGIN / root - need
    order = np.argsort(required)[::-1]
    given_up = np.zeros(len(need), bool)
    for count in range(_GIVE_UP + 1):
        given_up[:] = False
        given_up[order[:count]] = True
        if required[order[count]] <= _GAIN_MAX and np.sum(chips * spend(_MARGIN, given_up) ** 2) <= energy:
            break

    def fits(target: float, floor: float = _GAIN_MIN) -> bool:
        if np.any((np.maximum(target / root - need, floor) > _GAIN_MAX) & ~given_up):
            return False
        return float(np.sum(chips * spend(target, given_up, floor) ** 2)) <= energy

    lo, hi = -10.0, _ENOUGH
    if fits(hi):
        lo = hi
    for _ in range(24 if lo < hi else 0):  # to 1e-6
        target = 0.5 * (lo + hi)
        lo, hi = (target, hi) if fits(target) else (lo, target)
    # Energy left over once every bit has _ENOUGH: the floor, raised until it is spent.
    floor_lo, floor_hi = _GAIN_MIN, _GAIN_MAX
    for _ in range(24 if lo >= _ENOUGH else 0):
        floor = 0.5 * (floor_lo + floor_hi)
        floor_lo, floor_hi = (floor, floor_hi) if fits(lo, floor) else (floor_lo, floor)
    return spend(lo, given_up, floor_lo)


# --- detection --------------------------------------------------------------------------------------------------


def _whiten(luma: np.ndarray) -> np.ndarray:
    """High-passed luminance over its local spread (a tighter window than fluxframe-ss's: measured better on
    256-pixel images), clipped."""
    residual = luma - _blur(luma, 1.5)
    spread = np.sqrt(_blur(residual * residual, 3.0)) + 1.0
    residual /= spread
    np.clip(residual, -3.0, 3.0, out=residual)
    return residual


def _decode(soft: np.ndarray, length: int) -> tuple[str | None, int]:
    """BCH decoding helped by the soft values (Chase): the hard word, then the word with each combination of its
    ``_CHASE`` least reliable bits flipped, hard-decoded in turn; of the codewords found, the one closest to the
    soft values. ``errors`` is its Hamming distance from the hard word (at most the code's t + ``_CHASE``)."""
    hard = soft > 0
    if np.count_nonzero(soft == 0.0) > _bch(length).t:
        # No signal at all (a flat image reads exact zeros): the all-zero word would "decode" to the all-zero
        # message. Those bits are erasures, not zeros.
        return None, -1
    order = np.argsort(np.abs(soft))[:_CHASE]
    best: tuple[float, str | None, int] = (-np.inf, None, -1)
    seen: set[str] = set()
    for mask in range(1 << _CHASE):
        trial = hard.copy()
        for b in range(_CHASE):
            if mask >> b & 1:
                trial[order[b]] = not trial[order[b]]
        message, _ = decode_word(trial, length)
        if message is None or message in seen:
            continue
        seen.add(message)
        word = encode_bits(message) > 0.5
        fit = float(np.sum(np.where(word, soft, -soft)))
        if fit > best[0]:
            best = (fit, message, int(np.count_nonzero(word != hard)))
        if mask == 0:
            break  # the hard word itself decodes: take it
    return best[1], best[2]


def _autocorrelation(residual: np.ndarray) -> np.ndarray:
    spectrum = np.fft.rfft2(residual)
    power = spectrum.real**2 + spectrum.imag**2
    auto = np.fft.irfft2(power * _gauss_transfer(residual.shape, 1.2).astype(np.float32), s=residual.shape)
    auto /= float(power.sum()) / power.size * 2 + 1e-12
    return auto.astype(np.float32)


def _points(reach: int) -> tuple[np.ndarray, np.ndarray]:
    """Lattice coordinates (i, j) of half the plane (the autocorrelation is symmetric), origin left out."""
    steps = np.arange(-reach, reach + 1, dtype=np.float64)
    i, j = (g.ravel() for g in np.meshgrid(steps, steps, indexing="ij"))
    keep = (j > 0) | ((j == 0) & (i > 0))
    return i[keep], j[keep]


def _comb(auto: np.ndarray, v1: np.ndarray, v2: np.ndarray, reach: int,
          use: np.ndarray | None = None) -> np.ndarray:
    """For K candidate lattices (basis vectors v1[k], v2[k] as (x, y)), the autocorrelation summed over the
    lattice points within half the autocorrelation's size, over the square root of their number. ``use``
    (K × points, or points) fixes which points count, so that a refinement does not gain by crossing the edge."""
    height, width = auto.shape
    i, j = _points(reach)
    x = i[None, :] * v1[:, 0:1] + j[None, :] * v2[:, 0:1]
    y = i[None, :] * v1[:, 1:2] + j[None, :] * v2[:, 1:2]
    inside = (np.abs(y) <= height / 2 - 2) & (np.abs(x) <= width / 2 - 2) if use is None else np.broadcast_to(
        use, x.shape)
    return _lattice_score(auto, y, x, inside)


def _basis(lag: np.ndarray, angle: np.ndarray, aspect: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Basis vectors (x, y) of a tile lattice rotated by ``angle`` radians (counter-clockwise on screen, as
    PIL's rotate: y points down) with period ``lag`` along x and ``lag * aspect`` along y."""
    c, s = np.cos(angle), np.sin(angle)
    v1 = np.stack([lag * c, -lag * s], axis=-1)
    v2 = np.stack([lag * aspect * s, lag * aspect * c], axis=-1)
    return v1, v2


def _lattices(auto: np.ndarray) -> list[np.ndarray]:
    """Candidate lattices (the basis as (v1x, v1y, v2x, v2y)), best first: local maxima of a coarse search
    over period, angle (±``MAX_ANGLE``°) and aspect, unrefined."""
    longest = min(auto.shape) / 2 - 2
    if longest <= _LAG_MIN:
        return []
    lags = _LAG_MIN * np.exp(np.arange(0.0, np.log(longest / _LAG_MIN), 0.018))
    angles = np.radians(np.arange(-MAX_ANGLE, MAX_ANGLE + 0.01, 1.5))
    aspects = np.array(_ASPECTS)
    lg, an, asp = (g.ravel() for g in np.meshgrid(lags, angles, aspects, indexing="ij"))
    v1, v2 = _basis(lg, an, asp)
    score = _comb(auto, v1, v2, _REACH).reshape(len(lags), len(angles), len(aspects))
    padded = np.pad(score, 1, constant_values=-np.inf)
    centre = padded[1:-1, 1:-1, 1:-1]
    is_max = np.isfinite(centre)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            for dz in (-1, 0, 1):
                if dy or dx or dz:
                    is_max &= centre >= padded[1 + dy:padded.shape[0] - 1 + dy, 1 + dx:padded.shape[1] - 1 + dx,
                                               1 + dz:padded.shape[2] - 1 + dz]
    flat = np.flatnonzero(is_max)
    flat = flat[np.argsort(score.ravel()[flat])[::-1]][:_CANDIDATES]
    return [np.concatenate([v1[k], v2[k]]) for k in flat]


def _refine(auto: np.ndarray, base: np.ndarray, reach: int) -> np.ndarray:
    """Pattern search on the comb score over the four coordinates of the basis (the lattice points counted
    fixed to those well inside at the start)."""
    height, width = auto.shape
    i, j = _points(reach)
    x, y = i * base[0] + j * base[2], i * base[1] + j * base[3]
    use = (np.abs(y) <= height / 2 * 0.92 - 2) & (np.abs(x) <= width / 2 * 0.92 - 2)
    if not use.any():
        return base
    best = float(_comb(auto, base[None, :2], base[None, 2:], reach, use)[0])
    for step in (0.6, 0.3, 0.15, 0.07):
        moves = np.concatenate([np.eye(4), -np.eye(4)]) * step * max(1.0, np.hypot(*base[:2]) / 64)
        for _ in range(4):
            trial = base[None, :] + moves
            scores = _comb(auto, trial[:, :2], trial[:, 2:], reach, use)
            k = int(np.argmax(scores))
            if scores[k] <= best:
                break
            best, base = float(scores[k]), trial[k]
    return base


def _fold(residual: np.ndarray, v1: np.ndarray, v2: np.ndarray, count: np.ndarray | None = None,
          ) -> tuple[np.ndarray, np.ndarray]:
    """The residual resampled into the tile's frame (tile-frame point q ↦ image point A·q, A's columns v1/TILE
    and v2/TILE) and averaged modulo the tile; parts of the frame outside the image count as missing. Returns the
    fold and the count of samples per tile pixel (``count``: reuse one, for a lattice barely different)."""
    import cv2

    a = np.stack([v1, v2], axis=1) / TILE  # image (x, y) = a @ (u, v)
    inverse = np.linalg.inv(a)
    height, width = residual.shape
    corners = inverse @ np.array([[0, width, 0, width], [0, 0, height, height]], dtype=np.float64)
    low = np.floor(corners.min(axis=1))
    size = np.ceil(corners.max(axis=1) - low).astype(int) + 1
    out_w, out_h = int(size[0]), int(size[1])
    matrix = np.concatenate([a, (a @ low)[:, None]], axis=1)  # frame pixel (u, v) samples image a @ ((u, v) + low)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    rows, cols = -(-out_h // TILE), -(-out_w // TILE)
    warped = np.zeros((rows * TILE, cols * TILE), np.float32)
    cv2.warpAffine(residual, matrix, (out_w, out_h), dst=warped[:out_h, :out_w], flags=flags,
                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    def fold(plane: np.ndarray) -> np.ndarray:
        return plane.reshape(rows, TILE, cols * TILE).sum(axis=0).reshape(TILE, cols, TILE).sum(axis=1)

    if count is None:
        mask = np.zeros_like(warped)
        cv2.warpAffine(np.ones_like(residual), matrix, (out_w, out_h), dst=mask[:out_h, :out_w], flags=flags,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        count = np.maximum(fold(mask).astype(np.float64), 1.0)
    return fold(warped).astype(np.float64) / count, count


def _polish(residual: np.ndarray, best: tuple) -> tuple:
    """The lattice polished on the sync peak itself, coordinate by coordinate, coarse to fine: a period off by
    0.3 % drifts by a pixel over 300."""
    for step in (0.005, 0.002):
        improved = True
        rounds = 0
        while improved and rounds < 2:
            improved, rounds = False, rounds + 1
            size = step * float(np.hypot(*best[3][:2]))
            for axis in range(4):
                for sign in (-1.0, 1.0):
                    basis = best[3].copy()
                    basis[axis] += sign * size
                    folded, _ = _fold(residual, basis[:2], basis[2:], best[4])
                    confidence, offset = PATTERN.sync_peak(folded)
                    if confidence > best[0]:
                        best, improved = (confidence, offset, folded, basis, best[4]), True
    return best


def _geometry(v1: np.ndarray, v2: np.ndarray, shrink: int, base: int) -> tuple[float, tuple[float, float]]:
    """Rotation (degrees, counter-clockwise) and scale (x, y) relative to the tile as embedded at ``base``."""
    angle = math.degrees(math.atan2(-v1[1], v1[0]))
    unit = TILE * base / shrink
    return angle, (float(np.hypot(*v1)) / unit, float(np.hypot(*v2)) / unit)


def _priors(auto: np.ndarray) -> list[np.ndarray]:
    """The lattice as embedded (the tile's own period, no rotation, no aspect change), and the same period at the
    angle (±``MAX_ANGLE``°, steps of ``_PRIOR_STEP``°) whose lattice collects the most autocorrelation: an image
    rotated but not resized."""
    angles = np.radians(np.arange(-MAX_ANGLE, MAX_ANGLE + 1e-9, _PRIOR_STEP))
    v1, v2 = _basis(np.full(len(angles), float(TILE)), angles)
    best = int(np.argmax(_comb(auto, v1, v2, _REACH_FINE)))
    out = [np.array([TILE, 0.0, 0.0, TILE])]
    if abs(angles[best]) > 1e-9:
        out.append(np.concatenate([v1[best], v2[best]]))
    return out


def _search(luma: np.ndarray, shrink: int, prior: bool = True) -> tuple | None:
    """The best lattice of ``luma`` reduced ``shrink`` times: (confidence, offset, folded, basis, count, shrink,
    residual, start), ``start`` the first five as the best candidate gave them, before ``_polish``.

    With ``prior``, the lattice the mark was embedded on (the tile's own period, no rotation, no aspect change:
    what re-encoding, crops and colour or contrast changes leave), and that period at the autocorrelation's best
    angle (a rotation without resize), are tried first, unrefined (``_priors``), then the autocorrelation's
    candidates (see ``_lattices``): on textured photos at 256² the texture's own autocorrelation can outscore the
    mark's lattice, or pull the refinement 0.3-0.8 % off it."""
    import cv2

    if shrink > 1:
        luma = cv2.resize(luma, (luma.shape[1] // shrink, luma.shape[0] // shrink), interpolation=cv2.INTER_AREA)
    residual = _whiten(luma)
    auto = _autocorrelation(residual)
    best = None
    candidates = [(True, candidate) for candidate in _lattices(auto)]  # none where the image is too small
    if prior and candidates:
        candidates[:0] = [(False, basis) for basis in _priors(auto)]
    for refine, candidate in candidates:
        basis = _refine(auto, candidate, _REACH_FINE) if refine else candidate
        folded, count = _fold(residual, basis[:2], basis[2:])
        confidence, offset = PATTERN.sync_peak(folded)
        if best is None or confidence > best[0]:
            best = (confidence, offset, folded, basis, count)
        if confidence >= _SURE:
            break
    if best is None:
        return None
    start = best
    if best[0] >= _POLISH:
        best = _polish(residual, best)
    return (*best, shrink, residual, start)


def _chip_values(spectrum: np.ndarray, offset: tuple[float, float]) -> np.ndarray:
    """Every chip of a folded tile (given by its ``rfft2``) read by matched filtering with the tile's origin at
    ``offset`` (row, col; fractional: the fold is shifted by a phase ramp, exact for the smoothed tile) — what
    ``PATTERN.soft_words`` reads at an integer offset, before the chips are summed into coded bits."""
    fy = np.fft.fftfreq(TILE)[:, None]
    fx = np.fft.rfftfreq(TILE)[None, :]
    phase = np.exp(2j * np.pi * (fy * offset[0] + fx * offset[1]))
    return PATTERN.chip_sums(np.fft.irfft2(spectrum * _smoother(TILE, _SMOOTH) * phase, s=(TILE, TILE)))


def _subpixel(corr: np.ndarray, index: tuple[int, int]) -> tuple[float, float]:
    """The correlation's peak at ``index`` located to a fraction of a pixel (a parabola through it and its two
    cyclic neighbours, per axis)."""
    out = []
    for axis in (0, 1):
        step = np.zeros(2, int)
        step[axis] = 1
        before = corr[tuple((np.array(index) - step) % TILE)]
        after = corr[tuple((np.array(index) + step) % TILE)]
        centre = corr[index]
        curve = before - 2 * centre + after
        out.append(index[axis] + (float(np.clip(0.5 * (before - after) / curve, -0.5, 0.5)) if curve < 0 else 0.0))
    return out[0], out[1]


def _refit(residual: np.ndarray, basis: np.ndarray, count: np.ndarray, length: int,
           ) -> tuple[np.ndarray, np.ndarray]:
    """The lattice refitted on all the chips, for a word that did not decode on the lattice polished on the sync
    chips alone (a quarter of the tile): pattern search over the basis maximising the sync correlation plus the
    sum of the coded bits' soft magnitudes — all 256 chips, the message chips by their own sign — each lattice
    read at the sync peak located to a fraction of a pixel. Returns the basis and the coded bits' soft values
    there."""

    def score(trial: np.ndarray) -> tuple[float, np.ndarray]:
        folded, _ = _fold(residual, trial[:2], trial[2:], count)
        spectrum = np.fft.rfft2(folded)
        corr = PATTERN.sync_correlation(spectrum)
        index = np.unravel_index(int(np.argmax(corr)), corr.shape)
        chips = _chip_values(spectrum, _subpixel(corr, (int(index[0]), int(index[1]))))
        soft = PATTERN.words(chips, {length})[length]
        return float(np.sum(chips[PATTERN.sync] * PATTERN.sync_sign) + np.sum(np.abs(soft))), soft

    best, soft = score(basis)
    for step in _REFIT_STEPS:
        size = step * float(np.hypot(*basis[:2]))
        for _ in range(_REFIT_ROUNDS):
            improved = False
            for axis in range(4):
                for sign in (-1.0, 1.0):
                    trial = basis.copy()
                    trial[axis] += sign * size
                    value, trial_soft = score(trial)
                    if value > best:
                        best, soft, basis, improved = value, trial_soft, trial, True
            if not improved:
                break
    return basis, soft


def _rereadings(best: tuple, length: int):
    """The further readings of the coded word (soft values) where a confident lattice's word does not decode:
    on the lattice as found, before the polish on the sync chips (a texture can pull the sync peak a little off
    the mark's lattice: brick at 256²), then on the lattice refitted on all the chips (``_refit``). With the
    first reading, at most ``READINGS`` words are decoded per length; the confidence, offset and geometry stay
    the sync-polished lattice's."""
    _, _, _, basis, count, _, residual, start = best
    if start[3] is not basis:
        yield PATTERN.soft_words(start[2], start[1], {length})[length]
    yield _refit(residual, basis, count, length)[1]


def read(rgb: np.ndarray, lengths: set[int] | list[int], base_scale: int | None = None) -> dict[str, Any]:
    """Read a ``fluxframe-rs`` mark from ``rgb`` (uint8 H×W×3) for each message length in ``lengths``.

    Returns ``{"confidence", "rotation", "scale": (x, y), "offset": (row, col), "words": {length: {"soft",
    "hard", "message", "errors"}}}`` (as ``robust.read``, with the rotation in degrees). ``scale`` is relative to
    the tile as embedded at ``base_scale`` (default: the tile a mark of this image's own size would carry —
    unknown to a detector, so a 1024² image resized to half reads scale 1.0 against the 512² tile; see
    ``tile_scale``)."""
    import cv2

    height, width = rgb.shape[:2]
    luma = cv2.cvtColor(rgb.astype(np.float32), cv2.COLOR_RGB2GRAY)  # 0.299 R + 0.587 G + 0.114 B
    # Work on a copy reduced so that the tile of an image of this size comes back to its base size; a crop or
    # resize can leave a larger tile than that (chips of 8 px, which the whitening partly removes): a lattice
    # found long is searched again on a copy twice as small, and the more confident reading counts.
    shrink = max(1, round(min(height, width) / _WORK_EDGE))
    best = _search(luma, shrink)
    if (best is not None and best[0] < _SURE and float(np.hypot(*best[3][:2])) > _LONG_PERIOD
            and min(height, width) // (2 * shrink) >= 4 * _LAG_MIN):
        again = _search(luma, 2 * shrink, prior=False)
        if again is not None and again[0] > best[0]:
            best = again
    result: dict[str, Any] = {"confidence": 0.0, "rotation": None, "scale": None, "offset": None, "words": {}}
    if best is None:
        return result
    confidence, offset, folded, basis, _, shrink, _, _ = best
    for length, soft in PATTERN.soft_words(folded, offset, lengths).items():
        decoded, errors = _decode(soft, length)
        if decoded is None and confidence >= CONFIDENCE_THRESHOLD:
            for other in _rereadings(best, length):
                other_decoded, other_errors = _decode(other, length)
                if other_decoded is not None:
                    soft, decoded, errors = other, other_decoded, other_errors
                    break
        result["words"][length] = {"soft": soft, "hard": soft > 0, "message": decoded, "errors": errors}
    base = tile_scale(width, height) if base_scale is None else base_scale
    rotation, scale = _geometry(basis[:2], basis[2:], shrink, base)
    result.update(confidence=confidence, rotation=rotation, scale=scale, offset=offset)
    return result
