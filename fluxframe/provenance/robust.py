"""The ``fluxframe-ss`` watermark: a tiled spread-spectrum mark on luminance that survives what platforms do to
images — JPEG and WebP re-encoding, crops, resizes, brightness and contrast changes.

Why not a DWT-DCT block code: a crop shifts the block grid and a resize changes its scale, and every block code
(invisible-watermark's dwtDct and dwtDctSvd) then reads noise. This mark is built so that neither matters:

* **The tile.** A 128×128-pixel tile is a 32×32 grid of 4×4-pixel chips, each +1 or -1, smoothed with a Gaussian
  (σ = 1 px, cyclically, so the tile stays seamless). A fixed, pseudo-random quarter of the chips is a known
  synchronisation pattern; the other 768 carry the message, coded with a BCH code (``bchlib``; for 48 bits:
  77 check bits, up to 12 bit errors corrected), each coded bit on 6–7 chips scattered over the tile and
  multiplied by a pseudo-random ±1 sequence. The tile repeats over the whole image (at k times its size on
  images whose shorter edge is at least k·1024 px, so that a platform's downscale to ~1000 px keeps it).
* **Embedding.** The tiled pattern is added to luminance (R, G and B alike) with an amplitude that follows the
  local activity of the image — half a grey level in flat areas, up to 5 in texture — then scaled so that the
  image's PSNR against the unmarked one lies between ``PSNR_TARGET`` (40 dB, textured images) and
  ``PSNR_FLAT`` (44 dB: flat images are raised to it, or WebP's smoothing takes their mark away).
* **Detection.** The luminance is whitened (minus a Gaussian blur, divided by its local spread), which removes
  most of the image and keeps the pattern. The pattern is periodic, so the 2-D autocorrelation of the residual
  has a peak on every point of the lattice the tile period spans; the period whose lattice collects the most
  (searched over 0.3× to the largest scale the image allows, then refined in x and y separately) gives the
  scale the image was resized by. For the few best periods the residual is resampled back to the tile's own
  scale, folded modulo 128 into one tile (averaging every copy of it: a crop only removes some), and
  cross-correlated with the sync pattern by FFT, which gives the cyclic offset the crop left. The sync peak's
  height over the noise of that correlation, in standard deviations, is the **confidence**; the best period is
  polished on it. The chips are then read by matched filtering, each coded bit by correlation over its chips,
  and the BCH code corrects what is left.

A mark is claimed only when the confidence is at least ``CONFIDENCE_THRESHOLD`` (unmarked images: at most 5.6
over the 228 of ``robustness.unmarked_set``) and the BCH code decodes to a codeword within its correction radius
(bchlib alone accepts 0.8 % of random words; with that check, none of 50,000); ``match`` then also requires the
decoded message to equal one of those it looks for. Images with either edge under ``MIN_EDGE`` pixels are not
marked, and ``embed`` records why. Rotation, downscaling below about 0.35×, and regeneration are outside what it
survives (bench/watermark_robustness.py measures them).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from fluxframe.errors import ProvenanceError

METHOD = "fluxframe-ss"
TILE = 128  # tile period in pixels at the base scale
CHIP = 4  # chip edge in pixels at the base scale
GRID = TILE // CHIP
SYNC_CHIPS = GRID * GRID // 4
#: Smallest edge the method marks: below it a textured image cannot hold a readable mark at PSNR_TARGET.
MIN_EDGE = 4 * TILE
#: Embedding strength: the mark is scaled down where needed so the image keeps this PSNR against the original.
PSNR_TARGET = 40.0
#: ... and is raised where needed so that it reaches at least this one (flat images, see ``embed_rgb``).
PSNR_FLAT = 44.0
#: Sync-peak confidence (standard deviations over the correlation's noise floor) from which a mark is claimed.
CONFIDENCE_THRESHOLD = 7.0
MIN_MESSAGE_BITS, MAX_MESSAGE_BITS = 32, 96

_SEED = 0x66787373  # "fxss"
_SMOOTH = 1.0  # σ of the chip smoothing, in base-scale pixels
_AMP_FLAT, _AMP_MAX, _AMP_GAIN = 0.5, 5.0, 0.6  # amplitude in grey levels: floor, ceiling, gain on activity
_LAG_MIN = 0.3  # smallest scale searched, as a fraction of the base scale
_LAG_USUAL = 0.4  # below this scale, only two candidates are tried
_CANDIDATES = 6  # period candidates tried against the sync pattern
_SURE = 2 * CONFIDENCE_THRESHOLD  # a candidate this confident ends the search
_POLISH = 5.0  # a best candidate under this confidence is not polished


def validate_message(bits: str, *, key: str, method: str = METHOD) -> str:
    """``bits`` when a tiled mark (this one, or ``method``: fluxframe-rs shares the code) can carry it."""
    if not MIN_MESSAGE_BITS <= len(bits) <= MAX_MESSAGE_BITS:
        raise ProvenanceError(f"{key}: the {method} watermark carries {MIN_MESSAGE_BITS} to {MAX_MESSAGE_BITS} "
                              f"bits, got {len(bits)}")
    return bits


def too_small(width: int, height: int) -> str | None:
    """Why an image of this size is not marked, or None when it is large enough."""
    if min(width, height) >= MIN_EDGE:
        return None
    return (f"image is {width}x{height}, under the {MIN_EDGE} pixels per edge the {METHOD} watermark needs "
            "(smaller images cannot hold a mark that survives re-encoding at PSNR 40 dB); no watermark embedded")


# --- the code: BCH over the message, chips of the tile ----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _bch(length: int):
    """The BCH code for a ``length``-bit message: the strongest (up to 12 errors) whose word fits in 127 bits."""
    import bchlib

    data_bits = 8 * ((length + 7) // 8)
    for t in range(12, 0, -1):
        code = bchlib.BCH(t, m=7)
        if data_bits + code.ecc_bits <= 127:
            return code
    raise ProvenanceError(f"a {length}-bit message leaves no room for error correction")  # pragma: no cover


def _to_bytes(bits: str) -> bytearray:
    bits = bits + "0" * (-len(bits) % 8)
    return bytearray(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def _to_bits(data: bytes, count: int) -> str:
    return "".join(f"{byte:08b}" for byte in data)[:count]


def encode_bits(bits: str) -> np.ndarray:
    """The coded word of ``bits``: the message followed by the BCH check bits, as 0/1."""
    code = _bch(len(bits))
    ecc = code.encode(_to_bytes(bits))
    word = bits + _to_bits(ecc, code.ecc_bits)
    return np.array([c == "1" for c in word], dtype=np.float64)


def decode_word(hard: np.ndarray, length: int) -> tuple[str | None, int]:
    """The message of a coded word read from an image (0/1), and the bit errors corrected (-1: undecodable)."""
    code = _bch(length)
    message = "".join("1" if b else "0" for b in hard[:length])
    data = _to_bytes(message)
    ecc_bits = "".join("1" if b else "0" for b in hard[length:])
    ecc = _to_bytes(ecc_bits) + bytearray(code.ecc_bytes - (len(ecc_bits) + 7) // 8)
    errors = code.decode(data, ecc)
    # bchlib numbers bits from the least significant within each byte; an error placed in the padding bits of
    # the last check byte (never sent) means the word is no codeword's neighbour.
    if errors < 0 or any(loc // 8 * 8 + 7 - loc % 8 >= 8 * len(data) + code.ecc_bits
                         for loc in code.errloc[:errors]):
        return None, -1
    code.correct(data, ecc)
    corrected = _to_bits(bytes(data), 8 * len(data))
    if set(corrected[length:]) - {"0"}:  # the padding bits are known zeros: a correction there is a miscorrection
        return None, -1
    # bchlib reports success for some words far from every codeword (measured: 0.8 % of random words, at
    # Hamming distance 30-55 from the word it returns); only a codeword within the correction radius counts.
    distance = int(np.count_nonzero((encode_bits(corrected[:length]) > 0.5) != np.asarray(hard, dtype=bool)))
    if distance > code.t:
        return None, -1
    return corrected[:length], distance


def _gauss_transfer(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Transfer function (rfft2 layout) of a cyclic Gaussian blur of an array of ``shape``."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))


@functools.lru_cache(maxsize=8)
def _smoother(size: int, sigma: float) -> np.ndarray:
    """Transfer function of the chip smoothing of a size×size tile."""
    return _gauss_transfer((size, size), sigma)


class ChipPattern:
    """The chip tile of fluxframe's tiled marks (``fluxframe-ss`` here, ``fluxframe-rs`` in ``lattice``): a
    grid of ``chip``-pixel ±1 chips, a pseudo-random quarter of them (drawn from ``seed``) the synchronisation
    pattern and the rest the coded message spread by a ±1 sequence, smoothed cyclically (σ ``smooth``)."""

    def __init__(self, tile: int, chip: int, seed: int, smooth: float):
        self.size, self.chip, self.smooth = tile, chip, smooth
        self.grid = tile // chip
        rng = np.random.default_rng(seed)
        order = rng.permutation(self.grid * self.grid)
        count = self.grid * self.grid // 4
        self.sync, self.message = order[:count], order[count:]
        self.sync_sign = rng.choice([-1.0, 1.0], count)
        self.spread = rng.choice([-1.0, 1.0], len(self.message))
        sync_chips = np.zeros(self.grid * self.grid)
        sync_chips[self.sync] = self.sync_sign
        self._sync_spectrum = np.conj(np.fft.rfft2(self.tile(sync_chips)))

    def tile(self, chips: np.ndarray, scale: int = 1) -> np.ndarray:
        """The smoothed, seamless tile of a chip array (at ``scale`` times the base size)."""
        size, step = self.size * scale, self.chip * scale
        up = np.repeat(np.repeat(chips.reshape(self.grid, self.grid), step, axis=0), step, axis=1)
        return np.fft.irfft2(np.fft.rfft2(up) * _smoother(size, self.smooth * scale), s=(size, size))

    def chips(self, word: np.ndarray, gains: np.ndarray | None = None, sync_gain: float = 1.0) -> np.ndarray:
        """The chip array carrying a coded word (repeated over the message chips): each coded bit's chips at its
        ``gains`` entry (default 1), the sync chips at ``sync_gain``."""
        chips = np.zeros(self.grid * self.grid)
        chips[self.sync] = self.sync_sign * sync_gain
        bit = np.arange(len(self.message)) % len(word)
        chips[self.message] = self.spread * (2.0 * word[bit] - 1.0) * (1.0 if gains is None else gains[bit])
        return chips

    def sync_correlation(self, spectrum: np.ndarray) -> np.ndarray:
        """The sync pattern's cyclic cross-correlation with a folded tile, given by its ``rfft2``."""
        return np.fft.irfft2(spectrum * self._sync_spectrum, s=(self.size, self.size))

    def sync_peak(self, folded: np.ndarray) -> tuple[float, tuple[int, int]]:
        """Confidence (peak over the noise floor, in standard deviations) and cyclic offset of the sync pattern
        in a folded tile."""
        corr = self.sync_correlation(np.fft.rfft2(folded))
        index = np.unravel_index(int(np.argmax(corr)), corr.shape)
        return self._confidence(corr, index), (int(index[0]), int(index[1]))

    def sync_confidence(self, folded: np.ndarray, offset: tuple[int, int]) -> float:
        """The confidence ``sync_peak`` gives the sync pattern's correlation at ``offset``, peak or not."""
        return self._confidence(self.sync_correlation(np.fft.rfft2(folded)), offset)

    def _confidence(self, corr: np.ndarray, index) -> float:
        """The correlation at ``index`` over the rest (7×7 around it left out), in standard deviations."""
        peak = corr[tuple(index)]
        mask = np.ones_like(corr, dtype=bool)
        mask[np.ix_(*[[(i + d) % self.size for d in range(-3, 4)] for i in index])] = False
        rest = corr[mask]
        return float((peak - rest.mean()) / (rest.std() + 1e-12))

    def soft_words(self, folded: np.ndarray, offset: tuple[int, int], lengths) -> dict[int, np.ndarray]:
        """Per message length, the soft value of every coded bit: the chips read by matched filtering at the
        sync offset, each coded bit summed over its chips."""
        aligned = np.roll(folded, (-offset[0], -offset[1]), axis=(0, 1))
        matched = np.fft.irfft2(np.fft.rfft2(aligned) * _smoother(self.size, self.smooth), s=aligned.shape)
        return self.words(self.chip_sums(matched), lengths)

    def chip_sums(self, matched: np.ndarray) -> np.ndarray:
        """Every chip's value: the matched-filtered tile summed over each chip's pixels."""
        return matched.reshape(self.grid, self.chip, self.grid, self.chip).sum(axis=(1, 3)).ravel()

    def words(self, chips: np.ndarray, lengths) -> dict[int, np.ndarray]:
        """Per message length, the coded bits' soft values from the chip values (each bit summed over its chips)."""
        values = chips[self.message] * self.spread
        soft = {}
        for length in lengths:
            n = length + _bch(length).ecc_bits
            soft[length] = np.bincount(np.arange(len(self.message)) % n, weights=values, minlength=n)
        return soft


PATTERN = ChipPattern(TILE, CHIP, _SEED, _SMOOTH)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _blur(plane: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(plane, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def embed_rgb(rgb: np.ndarray, bits: str) -> np.ndarray:
    """``rgb`` (uint8 H×W×3) marked with ``bits``; the caller checks the size first (``too_small``)."""
    height, width = rgb.shape[:2]
    scale = max(1, min(height, width) // 1024)
    tile = PATTERN.tile(PATTERN.chips(encode_bits(bits)), scale)
    tile /= np.sqrt(np.mean(tile**2))
    size = tile.shape[0]
    pattern = np.tile(tile, (-(-height // size), -(-width // size)))[:height, :width].astype(np.float32)
    luma = _luma(rgb.astype(np.float32))
    detail = luma - _blur(luma, 1.5)
    activity = np.sqrt(_blur(detail * detail, 4.0))
    amplitude = np.clip(_AMP_FLAT + _AMP_GAIN * activity, _AMP_FLAT, _AMP_MAX)
    delta = amplitude * pattern
    # Between PSNR_TARGET and PSNR_FLAT: textured images reach the first, flat ones (graphics, gradients)
    # are raised to the second, or lossy WebP's smoothing of flat areas takes their whole mark away.
    rms = float(np.sqrt(np.mean(delta.astype(np.float64) ** 2)))
    limit, floor = (255.0 / 10 ** (target / 20) for target in (PSNR_TARGET, PSNR_FLAT))
    if rms > limit or rms < floor:
        delta *= (limit if rms > limit else floor) / max(rms, 1e-6)
    out = rgb.astype(np.float32) + delta[..., None]
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


# --- detection --------------------------------------------------------------------------------------------------


def _whiten(luma: np.ndarray) -> np.ndarray:
    """Residual of the luminance with most of the image removed: high-passed, divided by its local spread."""
    residual = luma - _blur(luma, 1.5)
    spread = np.sqrt(_blur(residual * residual, 6.0)) + 1.0
    residual /= spread
    np.clip(residual, -3.0, 3.0, out=residual)
    return residual


def _lattice_score(auto: np.ndarray, y: np.ndarray, x: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Per candidate lattice (rows of ``y``, ``x``: its points' lags), the cyclic autocorrelation read bilinearly
    at the points ``inside`` marks, summed over them and divided by the square root of their number (-inf where
    none is inside)."""
    height, width = auto.shape
    y0, x0 = np.floor(y), np.floor(x)
    fy, fx = y - y0, x - x0
    y0, x0 = y0.astype(np.int64) % height, x0.astype(np.int64) % width
    y1, x1 = (y0 + 1) % height, (x0 + 1) % width
    value = ((1 - fy) * ((1 - fx) * auto[y0, x0] + fx * auto[y0, x1])
             + fy * ((1 - fx) * auto[y1, x0] + fx * auto[y1, x1]))
    count = inside.sum(axis=1)
    return np.where(count > 0, (value * inside).sum(axis=1) / np.sqrt(np.maximum(count, 1)), -np.inf)


def _comb(auto: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """For each candidate period (px[k], py[k]), the autocorrelation summed over the points of that lattice
    (every (i·py, j·px) within half the autocorrelation's size, the origin left out), over the square root of
    their number: a tiled pattern puts a peak on every point of its lattice, image content does not."""
    height, width = auto.shape
    limit = min(height, width) / 2
    reach = int(limit // min(px.min(), py.min()))
    steps = np.arange(-reach, reach + 1, dtype=np.float64)
    i, j = (g.ravel() for g in np.meshgrid(steps, steps, indexing="ij"))
    keep = (i > 0) | ((i == 0) & (j > 0))  # the autocorrelation is symmetric: half the lattice is enough
    i, j = i[keep], j[keep]
    y = i[None, :] * py[:, None]
    x = j[None, :] * px[:, None]
    inside = (np.abs(y) <= limit) & (np.abs(x) <= limit)
    return _lattice_score(auto, y, x, inside)


def _periods(residual: np.ndarray) -> list[tuple[float, float]]:
    """Candidate (x, y) tile periods in pixels, from the autocorrelation of the residual: the best lattices of
    a search over isotropic periods, each refined for x and y separately."""
    height, width = residual.shape
    crop = residual[:min(height, 1024), :min(width, 1024)]  # enough periods for the estimate, at bounded cost
    spectrum = np.fft.rfft2(crop)
    power = spectrum.real**2 + spectrum.imag**2
    # Smoothed (peaks a few pixels wide, so a lattice point that misses a peak's centre by a pixel still counts)
    # in the same inverse transform.
    auto = np.fft.irfft2(power * _gauss_transfer(crop.shape, 1.5).astype(np.float32), s=crop.shape)
    auto /= float(power.sum()) / power.size * 2 + 1e-12  # about the unsmoothed value at lag 0
    longest = min(crop.shape) / 2  # the cyclic autocorrelation is symmetric about half the size
    shortest = _LAG_MIN * TILE
    if longest <= shortest:
        return []
    lags = shortest * np.exp(np.arange(0.0, np.log(longest / shortest), 0.003))
    score = _comb(auto, lags, lags)
    local = np.nonzero((score[1:-1] > score[:-2]) & (score[1:-1] >= score[2:]))[0] + 1
    # The best few periods at the usual scales (0.4x and up), and the best two below: strong downscales are
    # rarer, and short lags collect more of a texture's own correlation.
    ranked = local[np.argsort(score[local])[::-1]]
    usual = lags[ranked] >= _LAG_USUAL * TILE
    best = np.concatenate([ranked[usual][:_CANDIDATES], ranked[~usual][:2]])
    best = best[np.argsort(score[best])[::-1]]
    fine = 1.0 + np.arange(-6, 7) * 0.001
    gx, gy = (g.ravel() for g in np.meshgrid(fine, fine))
    out = []
    for k in best:
        refined = _comb(auto, lags[k] * gx, lags[k] * gy)
        m = int(np.argmax(refined))
        out.append((float(lags[k] * gx[m]), float(lags[k] * gy[m])))
    return out


def _fold(residual: np.ndarray, period: tuple[float, float]) -> np.ndarray:
    """The residual resampled to the base scale and averaged modulo the tile: one TILE×TILE accumulator."""
    import cv2

    sx, sy = period[0] / TILE, period[1] / TILE
    height, width = residual.shape
    out_w, out_h = int(width / sx), int(height / sy)
    matrix = np.array([[1.0 / sx, 0.0, 0.0], [0.0, 1.0 / sy, 0.0]])
    rows, cols = -(-out_h // TILE), -(-out_w // TILE)
    padded = np.zeros((rows * TILE, cols * TILE), np.float32)
    cv2.warpAffine(residual, matrix, (out_w, out_h), dst=padded[:out_h, :out_w], flags=cv2.INTER_LINEAR)
    total = padded.reshape(rows, TILE, cols * TILE).sum(axis=0).reshape(TILE, cols, TILE).sum(axis=1)
    count_y = np.bincount(np.arange(out_h) % TILE, minlength=TILE)
    count_x = np.bincount(np.arange(out_w) % TILE, minlength=TILE)
    return total.astype(np.float64) / np.maximum(np.outer(count_y, count_x), 1.0)


def read(rgb: np.ndarray, lengths: set[int] | list[int]) -> dict[str, Any]:
    """Read a ``fluxframe-ss`` mark from ``rgb`` (uint8 H×W×3) for each message length in ``lengths``.

    Returns ``{"confidence", "scale": (x, y), "offset": (row, col), "words": {length: {"soft", "hard",
    "message", "errors"}}}``: ``soft`` are the correlations of the coded bits, ``hard`` their signs as 0/1,
    ``message`` the BCH-decoded message (None when it does not decode) and ``errors`` the bits it corrected.
    """
    luma = _luma(rgb.astype(np.float32))
    # Large images carry a tile k times the base size (see ``embed_rgb``): averaging k×k pixels brings it back
    # to the base scale, and keeps the cost of reading bounded.
    shrink = max(1, min(luma.shape) // 1024)
    if shrink > 1:
        import cv2

        luma = cv2.resize(luma, (luma.shape[1] // shrink, luma.shape[0] // shrink), interpolation=cv2.INTER_AREA)
    residual = _whiten(luma)
    best: tuple[float, tuple[int, int], np.ndarray, tuple[float, float]] | None = None
    for period in _periods(residual):
        if min(period) < _LAG_MIN * TILE * 0.9:
            continue
        folded = _fold(residual, period)
        confidence, offset = PATTERN.sync_peak(folded)
        if best is None or confidence > best[0]:
            best = (confidence, offset, folded, period)
        if confidence >= _SURE:  # the candidates come best first: this one is it
            break
    result: dict[str, Any] = {"confidence": 0.0, "scale": None, "offset": None, "words": {}}
    if best is None:
        return result
    # Polish the scale on the sync peak itself, coarse to fine: a period off by 0.2 % drifts by a pixel over 500.
    # Not worth it where there is no peak to polish (unmarked images read 3.5-5.6).
    for step in (0.003, 0.0015) if best[0] >= _POLISH else ():
        for axis in (0, 1):
            start = best
            for sign in (-1.0, 1.0):
                period = list(start[3])
                period[axis] *= 1.0 + sign * step
                folded = _fold(residual, (period[0], period[1]))
                confidence, offset = PATTERN.sync_peak(folded)
                if confidence > best[0]:
                    best = (confidence, offset, folded, (period[0], period[1]))
    confidence, offset, folded, period = best
    result.update(confidence=confidence, scale=(shrink * period[0] / TILE, shrink * period[1] / TILE),
                  offset=offset)
    for length, soft in PATTERN.soft_words(folded, offset, lengths).items():
        hard = soft > 0
        decoded, errors = decode_word(hard, length)
        result["words"][length] = {"soft": soft, "hard": hard, "message": decoded, "errors": errors}
    return result
