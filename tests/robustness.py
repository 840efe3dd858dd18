"""What platforms do to images, and the images to measure a watermark on: shared by
tests/test_provenance_robust.py and bench/watermark_robustness.py, so the README's figures and the tests measure
the same thing. The image sets need scikit-image (the test extra) for its bundled photos, which load offline.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

Attack = Callable[[Image.Image], Image.Image]


def _reencode(image: Image.Image, fmt: str, **options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    out = Image.open(io.BytesIO(buffer.getvalue()))
    out.load()
    return out.convert("RGB")


def jpeg(quality: int) -> Attack:
    """A JPEG save at ``quality`` with PIL's defaults otherwise (4:2:0 chroma), as platforms encode."""
    return lambda image: _reencode(image, "JPEG", quality=quality)


def webp(quality: int) -> Attack:
    return lambda image: _reencode(image, "WEBP", quality=quality)


def crop(left: float = 0.0, top: float = 0.0, right: float = 0.0, bottom: float = 0.0) -> Attack:
    """Cut these fractions of the width / height off each side."""

    def attack(image: Image.Image) -> Image.Image:
        width, height = image.size
        return image.crop((round(left * width), round(top * height), width - round(right * width),
                           height - round(bottom * height)))

    return attack


def resize(factor: float) -> Attack:
    """Resize by ``factor`` with bicubic resampling (PIL antialiases when shrinking)."""

    def attack(image: Image.Image) -> Image.Image:
        width, height = image.size
        return image.resize((round(width * factor), round(height * factor)), Image.Resampling.BICUBIC)

    return attack


def brightness(factor: float) -> Attack:
    return lambda image: ImageEnhance.Brightness(image).enhance(factor)


def contrast(factor: float) -> Attack:
    return lambda image: ImageEnhance.Contrast(image).enhance(factor)


def chain(*attacks: Attack) -> Attack:
    def attack(image: Image.Image) -> Image.Image:
        for step in attacks:
            image = step(image)
        return image

    return attack


def rotate(degrees: float) -> Attack:
    return lambda image: image.rotate(degrees, resample=Image.Resampling.BICUBIC)


def rotate_cropped(degrees: float) -> Attack:
    """Rotate, then keep the largest centred rectangle of the original's aspect that holds no filled corner."""

    def attack(image: Image.Image) -> Image.Image:
        width, height = image.size
        rotated = image.rotate(degrees, resample=Image.Resampling.BICUBIC)
        theta = np.radians(abs(degrees))
        keep = 1.0 / (np.cos(theta) + max(width, height) / min(width, height) * np.sin(theta))
        return centre_crop(float(keep))(rotated)

    return attack


def aspect(x: float, y: float = 1.0) -> Attack:
    """Stretch by ``x`` horizontally and ``y`` vertically (bicubic)."""

    def attack(image: Image.Image) -> Image.Image:
        width, height = image.size
        return image.resize((round(width * x), round(height * y)), Image.Resampling.BICUBIC)

    return attack


def centre_crop(keep: float) -> Attack:
    """Keep the centre ``keep`` of each edge (the area kept is ``keep`` squared), as Video Seal's crop ratio."""
    cut = (1.0 - keep) / 2
    return crop(cut, cut, cut, cut)


def blur(sigma: float) -> Attack:
    """A Gaussian blur of radius (standard deviation) ``sigma`` pixels."""
    return lambda image: image.filter(ImageFilter.GaussianBlur(sigma))


#: The attacks of issue 8, each alone, and the combination.
ATTACKS: dict[str, Attack] = {
    "none": lambda image: image,
    "JPEG 90": jpeg(90),
    "JPEG 75": jpeg(75),
    "JPEG 60": jpeg(60),
    "WebP 80": webp(80),
    "crop 10% left": crop(left=0.1),
    "crop 10% top": crop(top=0.1),
    "crop 10% right+bottom": crop(right=0.1, bottom=0.1),
    "crop 10% all sides": crop(0.1, 0.1, 0.1, 0.1),
    "crop 7% left+top, 3% right": crop(left=0.07, top=0.07, right=0.03),
    "resize 50%": resize(0.5),
    "resize 150%": resize(1.5),
    "brightness +10%": brightness(1.1),
    "brightness -10%": brightness(0.9),
    "contrast +10%": contrast(1.1),
    "contrast -10%": contrast(0.9),
    "JPEG 75 + crop 10% all sides + resize 50%": chain(jpeg(75), crop(0.1, 0.1, 0.1, 0.1), resize(0.5)),
    "crop 10% + resize 50% + JPEG 75": chain(crop(left=0.1, top=0.1), resize(0.5), jpeg(75)),
}

#: Beyond the bar, measured to say what the mark does not survive.
BEYOND: dict[str, Attack] = {
    "resize 73% + JPEG 80 (an odd scale)": chain(resize(0.73), jpeg(80)),
    "resize 40%": resize(0.4),
    "resize 30%": resize(0.3),
    "crop 50% (keep the centre quarter)": crop(0.25, 0.25, 0.25, 0.25),
    "rotate 2°": rotate(2.0),
    "JPEG 30": jpeg(30),
    "blur (Gaussian, 2 px)": blur(2.0),
}


#: Issue 26, part 2: each attack alone and the combination, for fluxframe-rs at every size from 256 px.
ISSUE26: dict[str, Attack] = {
    "none": ATTACKS["none"],
    "JPEG 90": jpeg(90),
    "JPEG 75": jpeg(75),
    "JPEG 60": jpeg(60),
    "WebP 80": webp(80),
    "crop 10% left": crop(left=0.1),
    "crop 10% top": crop(top=0.1),
    "crop 10% right": crop(right=0.1),
    "crop 10% bottom": crop(bottom=0.1),
    "crop 10% all sides": crop(0.1, 0.1, 0.1, 0.1),
    "resize 50%": resize(0.5),
    "resize 150%": resize(1.5),
    "brightness +10%": brightness(1.1),
    "brightness -10%": brightness(0.9),
    "contrast +10%": contrast(1.1),
    "contrast -10%": contrast(0.9),
    "rotate +2° (filled)": rotate(2.0),
    "rotate -2° (filled)": rotate(-2.0),
    "rotate +5° (filled)": rotate(5.0),
    "rotate -5° (filled)": rotate(-5.0),
    "rotate +2° (cropped)": rotate_cropped(2.0),
    "rotate -2° (cropped)": rotate_cropped(-2.0),
    "rotate +5° (cropped)": rotate_cropped(5.0),
    "rotate -5° (cropped)": rotate_cropped(-5.0),
    "aspect x 0.9, y 1.0": aspect(0.9, 1.0),
    "JPEG 75 + crop 10% all sides + resize 50%": ATTACKS["JPEG 75 + crop 10% all sides + resize 50%"],
}


def grid(jpeg_qualities=(40, 50, 60, 70, 80, 90), crops=(0.3, 0.5, 0.7, 0.9), resizes=(0.3, 0.5, 0.7, 0.9),
         rotations=(1, 2, 5, 10), brightnesses=(0.5, 0.75, 1.25, 1.5, 2.0), blurs=(0.5, 1.0, 2.0, 3.0),
         aspects=(0.8, 0.9, 1.1), ) -> dict[str, dict[str, Attack]]:
    """issue 26's Video Seal–style grid, by family: JPEG quality, centre crop and resize by the ratio of each edge
    kept (1.0 is the unattacked image, the row "none"), rotation in degrees (corners filled black, size kept),
    brightness factor, Gaussian blur σ in pixels, aspect change (x stretched, y kept), and the combined JPEG 75 +
    crop 10 % all sides + resize 50 %."""
    return {
        "none": {"none": ATTACKS["none"]},
        "JPEG": {f"JPEG {q}": jpeg(q) for q in jpeg_qualities},
        "crop": {f"crop {r:g}": centre_crop(r) for r in crops},
        "resize": {f"resize {r:g}": resize(r) for r in resizes},
        "rotation": {f"rotate {d:g}°": rotate(d) for d in rotations},
        "brightness": {f"brightness {f:g}": brightness(f) for f in brightnesses},
        "blur": {f"blur σ {s:g}": blur(s) for s in blurs},
        "aspect": {f"aspect x {x:g}": aspect(x, 1.0) for x in aspects},
        "combined": {"JPEG 75 + crop 10% + resize 50%": ATTACKS["JPEG 75 + crop 10% all sides + resize 50%"]},
    }

COLOUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                 "retina", "colorwheel")
GREY_PHOTOS = ("camera", "coins", "moon", "brick", "grass", "gravel", "clock", "cell")


def photo(name: str, size: tuple[int, int] = (1024, 1024), box: tuple[float, float, float, float] | None = None,
          ) -> Image.Image:
    """A scikit-image photo as RGB, cut to ``box`` (fractions left, top, right, bottom) and resized."""
    from skimage import data

    pixels = getattr(data, name)()
    image = Image.fromarray(pixels)
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        image = white
    image = image.convert("RGB")
    if box is not None:
        width, height = image.size
        image = image.crop((round(box[0] * width), round(box[1] * height), round(box[2] * width),
                            round(box[3] * height)))
    return image.resize(size, Image.Resampling.LANCZOS)


def generated(kind: str, size: tuple[int, int] = (1024, 1024), seed: int = 0) -> Image.Image:
    """Synthetic images: "gradient" (smooth, flat), "shapes" (flat areas and hard edges), "clouds" (smooth
    noise), "noise" (fine colour noise on a gradient)."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    if kind == "gradient":
        rgb = np.stack([40 + 180 * x, 60 + 150 * y, 200 - 120 * x * y], axis=-1)
    elif kind == "noise":
        rgb = np.stack([60 + 140 * x, 90 + 100 * y, 150 + 0 * x], axis=-1) + rng.normal(0, 12, (height, width, 3))
    elif kind == "clouds":
        rgb = np.zeros((height, width, 3))
        for octave in range(1, 7):
            cells = 2**octave
            field = rng.random((cells + 1, cells + 1, 3)).astype(np.float32)
            rgb += np.asarray(Image.fromarray((field * 255).astype(np.uint8)).resize(
                (width, height), Image.Resampling.BICUBIC), dtype=np.float64) / 2**octave
        rgb = rgb / rgb.max() * 230
    elif kind == "shapes":
        image = Image.new("RGB", size, (235, 230, 220))
        draw = ImageDraw.Draw(image)
        for _ in range(25):
            x0, y0 = rng.integers(0, width), rng.integers(0, height)
            w, h = rng.integers(40, width // 3), rng.integers(40, height // 3)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
        return image
    else:
        raise ValueError(f"unknown generated image kind {kind!r}")
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def marked_set(size: int = 1024, square: bool = False) -> dict[str, Image.Image]:
    """The 20 images the attack matrix runs on: 16 scikit-image photos (8 colour, 8 grey), most square, some
    landscape or portrait (all square with ``square``), and 4 generated ones."""
    landscape, portrait = (size, size * 3 // 4), (size * 3 // 4, size)
    shapes = {} if square else {"coffee": landscape, "rocket": landscape, "hubble_deep_field": landscape,
                                "cell": portrait, "clock": landscape}
    images = {name: photo(name, shapes.get(name, (size, size))) for name in COLOUR_PHOTOS + GREY_PHOTOS}
    for kind in ("gradient", "shapes", "clouds", "noise"):
        images[kind] = generated(kind, (size, size))
    return images


def sized_set(width: int, height: int) -> dict[str, Image.Image]:
    """``marked_set``'s 20 images, every one at exactly ``width`` × ``height`` (issue 26's 256², 384×256, ...)."""
    images = {name: photo(name, (width, height)) for name in COLOUR_PHOTOS + GREY_PHOTOS}
    for kind in ("gradient", "shapes", "clouds", "noise"):
        images[kind] = generated(kind, (width, height))
    return images


def unmarked_set() -> list[tuple[str, Image.Image]]:
    """228 images never marked by fluxframe: each of the 16 scikit-image photos cut at 12 different boxes and
    sizes (offsets, zooms, aspect ratios, 256 to 1024 pixels), and 36 synthetic ones (gradients, shapes,
    clouds, noise at 3 sizes, 3 seeds each)."""
    boxes = [(0, 0, 1, 1), (0.1, 0.1, 0.9, 0.9), (0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1), (0.25, 0, 1, 0.75),
             (0.13, 0.29, 0.71, 0.97), (0, 0.2, 1, 0.8), (0.3, 0.1, 0.6, 0.9), (0.05, 0.4, 0.95, 1),
             (0.37, 0.37, 0.63, 0.63), (0, 0, 1, 0.5), (0.2, 0.05, 0.8, 0.65)]
    sizes = [(1024, 1024), (768, 768), (512, 512), (640, 480), (480, 640), (300, 300), (1024, 768), (256, 384),
             (900, 600), (512, 512), (700, 350), (400, 400)]
    out = []
    for name in COLOUR_PHOTOS + GREY_PHOTOS:
        for box, size in zip(boxes, sizes, strict=True):
            out.append((f"{name} {box} {size[0]}x{size[1]}", photo(name, size, box)))
    for kind in ("gradient", "shapes", "clouds", "noise"):
        for size in ((1024, 1024), (640, 480), (320, 320)):
            for seed in (1, 2, 3):
                out.append((f"{kind} {size[0]}x{size[1]} seed {seed}", generated(kind, size, seed)))
    return out


def psnr(original: Image.Image, marked: Image.Image) -> float:
    a = np.asarray(original.convert("RGB"), dtype=np.float64)
    b = np.asarray(marked.convert("RGB"), dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
