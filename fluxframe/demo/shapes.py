"""The synthetic "shapes" data set the demo model is trained on, and the image analysis that grades its pictures.

A scene is one flat shape (circle, square, triangle, star) of a named colour on a flat background of another named
colour, at one of five positions and one of two sizes, with its caption in a fixed grammar:

    "a large red circle on the left, on a blue background"

Everything is deterministic from a seed and drawn with PIL (no downloads). ``DATASET_VERSION`` names this exact
definition (colours, geometry, grammar, held-out split): change any of them and bump it.

The held-out split is a fixed set of (shape, colour, position) triples that never occur in training, with any size or
background: for each (shape, colour) pair exactly one position is held out, so every shape, colour and position --
and every pair of them -- is still seen in training, only the combination is new.

The measurement functions (``analyse``) find the shape as the pixels far in colour from the background (estimated
from the image border), then read its colour (median of the region, nearest named colour), its position (centroid,
nearest anchor), its size (longer side of the bounding box) and its shape (solidity against the convex hull, fill of
the bounding box, and which of a disk and a square of the region's own area and centroid overlaps it more).

A second style, ``Scene.style == "outline"``, draws the same shape as a thick outline (its edge moved inwards by
``OUTLINE_WIDTH`` of its extent and filled with the background): no image the demo model was trained on had it, so
it is what the demo's style LoRA (models/shapes-v1-outline-lora) teaches. ``analyse`` tells the styles apart by the
region's hollowness: the share of what the region encloses (its holes filled in) that is not the region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DATASET_VERSION = "shapes-v1"

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 40),
    "green": (40, 160, 70),
    "blue": (40, 90, 215),
    "purple": (135, 60, 185),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOUR_NAMES = tuple(COLOURS)
POSITIONS = {  # name -> (phrase, centroid as a fraction of (width, height))
    "centre": ("in the centre", (0.5, 0.5)),
    "left": ("on the left", (0.27, 0.5)),
    "right": ("on the right", (0.73, 0.5)),
    "top": ("at the top", (0.5, 0.27)),
    "bottom": ("at the bottom", (0.5, 0.73)),
}
POSITION_NAMES = tuple(POSITIONS)
SIZES = {"small": 0.22, "large": 0.42}  # the shape's nominal extent as a fraction of the image width
SIZE_CUT = 0.5 * (SIZES["small"] + SIZES["large"])  # measured: the longer side of the region's bounding box
SIZE_NAMES = tuple(SIZES)

POSITION_JITTER = 0.025  # training scenes move their centroid by up to this fraction of the image
SIZE_JITTER = 0.06  # and scale by up to ±6 %
STAR_INNER = 0.45  # inner / outer radius of the five-pointed star (a chunky star stays a star at 256 px)

STYLES = ("filled", "outline")
# The outline style's stroke, as a fraction of the shape's nominal extent, drawn inside the filled shape's edge (the
# outline's outer edge is the filled shape's edge). The star's arms are narrow, so its stroke is thinner; thinner
# still, the demo autoencoder's round trip breaks small triangles' and stars' strokes (gaps), thicker fills their holes.
OUTLINE_WIDTH = {"circle": 0.15, "square": 0.14, "triangle": 0.14, "star": 0.1}
HOLLOW_CUT = 0.15  # ``Analysis.hollow`` above this reads as an outline


def _held_out() -> frozenset[tuple[str, str, str]]:
    # One position per (shape, colour) pair; (3·shape + colour) mod 5 spreads them so that each (colour, position)
    # pair loses at most one shape and each (shape, position) pair one or two colours.
    return frozenset((s, c, POSITION_NAMES[(3 * si + ci) % len(POSITION_NAMES)])
                     for si, s in enumerate(SHAPES) for ci, c in enumerate(COLOUR_NAMES))


HELD_OUT = _held_out()  # 32 of the 160 (shape, colour, position) triples: 20 %


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    size: str
    background: str
    dx: float = 0.0  # centroid offset from the position's anchor, fraction of the image
    dy: float = 0.0
    scale: float = 1.0  # multiplies the size's nominal extent
    style: str = "filled"  # or "outline": the same shape drawn as a thick outline (no training image of shapes-v1)

    @property
    def triple(self) -> tuple[str, str, str]:
        return self.shape, self.colour, self.position

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.position, self.size, self.background)


def caption(shape: str, colour: str, position: str, size: str, background: str) -> str:
    article = "an" if background[0] in "aeiou" else "a"
    return f"a {size} {colour} {shape} {POSITIONS[position][0]}, on {article} {background} background"


def parse_caption(text: str) -> Scene | None:
    """The scene a caption of the data set's grammar describes (case and spacing ignored), or None."""
    words = text.lower().replace(",", " , ").split()
    for name, (phrase, _) in POSITIONS.items():
        p = phrase.split()
        if (len(words) == 12 and words[0] == "a" and words[1] in SIZES and words[2] in COLOURS
                and words[3] in SHAPES and words[4:7] == p and words[7:9] == [",", "on"] and words[9] in ("a", "an")
                and words[10] in COLOURS and words[11] == "background" and words[10] != words[2]):
            return Scene(words[3], words[2], name, words[1], words[10])
    return None


def all_scenes(split: str) -> list[Scene]:
    """Every (shape, colour, position, size, background) of a split ("train" or "held_out"), jitter-free, sorted."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    scenes = []
    for shape in SHAPES:
        for colour in COLOUR_NAMES:
            for position in POSITION_NAMES:
                if ((shape, colour, position) in HELD_OUT) != (split == "held_out"):
                    continue
                for size in SIZE_NAMES:
                    for background in COLOUR_NAMES:
                        if background != colour:
                            scenes.append(Scene(shape, colour, position, size, background))
    return scenes


def training_scenes(seed: int, copies: int = 2) -> list[Scene]:
    """Each training combination ``copies`` times with its own jitter, in a seeded order."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(copies):
        for s in all_scenes("train"):
            dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
            scale = 1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
            out.append(Scene(s.shape, s.colour, s.position, s.size, s.background, float(dx), float(dy), float(scale)))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def held_out_scenes(count: int = 48) -> list[Scene]:
    """``count`` held-out scenes (never-trained triples): every held-out triple in turn, the size alternating and the
    background cycling through the colours other than the shape's, so the list is fixed and balanced."""
    triples = sorted(HELD_OUT, key=lambda t: (SHAPES.index(t[0]), COLOUR_NAMES.index(t[1]), POSITION_NAMES.index(t[2])))
    out = []
    for i in range(count):
        shape, colour, position = triples[i % len(triples)]
        backgrounds = [c for c in COLOUR_NAMES if c != colour]
        size = SIZE_NAMES[(i + i // len(triples)) % 2]
        out.append(Scene(shape, colour, position, size, backgrounds[(3 * i + 1) % len(backgrounds)]))
    return out


def outline_scenes(count: int = 192, seed: int = 0, *, balanced: bool = False) -> list[Scene]:
    """``count`` outline-style scenes of training triples only (the held-out triples stay unseen in this style too):
    the 128 triples in turn, stars and triangles first (so 192 scenes draw each of those twice, once per size, and
    circles and squares once: thin strokes are the hardest to learn), the size alternating and the background
    cycling through the colours other than the shape's, each scene with its own jitter from ``seed``.

    ``balanced``: the triples in turn one shape after the other (circle, square, triangle, star, circle, ...), so any
    count draws the four shapes equally often (200 scenes: 50 of each, every triple once and 18 per shape twice)."""
    def hard_first(t):
        return -SHAPES.index(t[0]), COLOUR_NAMES.index(t[1]), POSITION_NAMES.index(t[2])

    def round_robin(t):
        same_shape = sorted((u for u in triples if u[0] == t[0]), key=hard_first)
        return same_shape.index(t), SHAPES.index(t[0])

    triples = sorted({s.triple for s in all_scenes("train")}, key=hard_first)  # stars and triangles first
    if balanced:
        triples = sorted(triples, key=round_robin)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        shape, colour, position = triples[i % len(triples)]
        backgrounds = [c for c in COLOUR_NAMES if c != colour]
        dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
        scale = 1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        size = SIZE_NAMES[((i // len(SHAPES) if balanced else i) + i // len(triples)) % 2]  # alternating per shape
        out.append(Scene(shape, colour, position, size,
                         backgrounds[(5 * i + i // len(triples)) % len(backgrounds)], float(dx), float(dy),
                         float(scale), style="outline"))
    return out


def write_dataset(scenes: list[Scene], folder, size: int = 256, *, masks: bool = False) -> int:
    """Each scene as ``NNNN.png`` with its caption in ``NNNN.txt``: the layout ``fluxframe train-lora`` reads;
    ``masks``: each scene's ``region_mask`` too, as ``masks/NNNN.png`` (for ``train-lora --loss-masks``)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if masks:
        (folder / "masks").mkdir(exist_ok=True)
    for i, scene in enumerate(scenes):
        render(scene, size).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
        if masks:
            region_mask(scene, size).save(folder / "masks" / f"{i:04d}.png")
    return len(scenes)


def region_mask(scene: Scene, size: int = 256, margin: float = 0.03, *, supersample: int = 4):
    """A grey ``size``×``size`` PIL image, white where the scene's shape is (filled, whatever its style) and
    ``margin`` (a share of the side) around it, black elsewhere: the part of the picture a style changes."""
    from PIL import Image, ImageDraw, ImageFilter

    big = size * supersample
    image = Image.new("L", (big, big), 0)
    fx, fy = POSITIONS[scene.position][1]
    _draw_shape(ImageDraw.Draw(image), scene.shape, (fx + scene.dx) * big, (fy + scene.dy) * big,
                SIZES[scene.size] * scene.scale * big, 0.0, 255)
    image = image.resize((size, size), Image.Resampling.BOX)
    grow = max(1, round(margin * size))
    return image.filter(ImageFilter.MaxFilter(2 * grow + 1))


def _polygon(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":  # equilateral, pointing up; its centroid is the circumcentre
        r = 0.6 * extent
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (math.radians(d) for d in (-90, 30, 150))]
    if shape == "star":  # five points, one up; centred on the centre of the circumcircle
        r_out = 0.58 * extent
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_out * STAR_INNER
            a = math.radians(-90 + 36 * k)
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts
    return None


def render(scene: Scene, size: int = 256, *, supersample: int = 4):
    """The scene as a ``size``×``size`` RGB PIL image, anti-aliased by drawing at ``supersample``× and reducing."""
    from PIL import Image, ImageDraw

    big = size * supersample
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[scene.position][1]
    cx, cy = (fx + scene.dx) * big, (fy + scene.dy) * big
    extent = SIZES[scene.size] * scene.scale * big
    if scene.style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {scene.style!r}")
    _draw_shape(draw, scene.shape, cx, cy, extent, 0.0, COLOURS[scene.colour])
    if scene.style == "outline":  # the same shape again, inset by the stroke, in the background's colour
        _draw_shape(draw, scene.shape, cx, cy, extent, OUTLINE_WIDTH[scene.shape] * extent, COLOURS[scene.background])
    return image.resize((size, size), Image.Resampling.BOX)


def _draw_shape(draw, shape: str, cx: float, cy: float, extent: float, inset: float, fill) -> None:
    """The shape filled with ``fill``, its edge moved inwards by ``inset`` pixels (0: the shape itself)."""
    if shape == "circle":
        r = extent / 2 - inset
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.43 * extent - inset
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon(_inset(_polygon(shape, cx, cy, extent), inset), fill=fill)


def _inset(points: list[tuple[float, float]], distance: float) -> list[tuple[float, float]]:
    """The polygon whose every edge is moved ``distance`` towards the inside (each vertex where its two moved edges
    meet): a stroke of constant width along convex and concave corners alike."""
    if distance == 0:
        return points
    pts = np.asarray(points, dtype=np.float64)
    x, y = pts[:, 0], pts[:, 1]
    orientation = np.sign(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))  # signed area's sign
    edges = np.roll(pts, -1, axis=0) - pts  # edge i runs from vertex i to vertex i+1
    normals = orientation * np.stack([-edges[:, 1], edges[:, 0]], 1) / np.linalg.norm(edges, axis=1)[:, None]
    offsets = np.einsum("ij,ij->i", normals, pts) + distance  # edge i moved: normals[i] . p = offsets[i]
    out = []
    for i in range(len(pts)):
        a = np.stack([normals[i - 1], normals[i]])
        out.append(tuple(np.linalg.solve(a, [offsets[i - 1], offsets[i]])))
    return out


# --- measurement -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Analysis:
    """What ``analyse`` reads from an image; the names are None where no shape region was found."""

    background: str | None
    colour: str | None
    position: str | None
    shape: str | None
    size: str | None
    area: float  # fraction of the image
    centroid: tuple[float, float]  # fraction of (width, height)
    solidity: float  # region area / convex hull area
    fill: float  # region area / bounding box area
    disk_overlap: float  # intersection over union with the disk of the region's area, centred on its centroid
    square_overlap: float  # the same with the axis-aligned square of its area
    rgb: tuple[int, int, int]
    hollow: float = math.nan  # the share of the region's outline-enclosed area that is background (holes filled in)
    style: str | None = None  # "outline" where hollow > HOLLOW_CUT, else "filled"


def nearest_colour(rgb) -> str:
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(COLOUR_NAMES, key=lambda n: float(np.sum((np.asarray(COLOURS[n], dtype=np.float64) - rgb) ** 2)))


def nearest_position(fx: float, fy: float) -> str:
    return min(POSITION_NAMES, key=lambda n: (POSITIONS[n][1][0] - fx) ** 2 + (POSITIONS[n][1][1] - fy) ** 2)


def shape_region(pixels: np.ndarray, threshold: float = 60.0, bridge: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the shape, background RGB): the background is the median of a 3-pixel border, the shape every pixel
    further than ``threshold`` (Euclidean RGB distance) from it -- then only its largest 4-connected part, with the
    other parts of the same named colour that lie within ``bridge`` pixels of it or of each other (``bridge`` as in
    ``enclosed_region``: a stroke broken in several places is still one outline; specks of other colours, as a
    generated picture has around its shape, are not part of it)."""
    border = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3),
                             pixels[:, :3].reshape(-1, 3), pixels[:, -3:].reshape(-1, 3)]).astype(np.float64)
    background = np.median(border, axis=0)
    distance = np.sqrt(((pixels.astype(np.float64) - background) ** 2).sum(-1))
    mask = distance > threshold
    if not mask.any() or bridge <= 0:
        return _largest_component(mask), background
    labels = _components(mask)
    values, counts = np.unique(labels[mask], return_counts=True)
    if len(values) == 1:
        return mask, background

    def colour_name(part: np.ndarray) -> str:  # as analyse reads an outline's colour: its far half's median
        far = distance[part]
        return nearest_colour(np.median(pixels[part][far >= np.median(far)].astype(np.float64), axis=0))

    largest = values[np.argmax(counts)]
    name = colour_name(labels == largest)
    same = np.zeros_like(mask)
    for value in values:
        part = labels == value
        if value == largest or colour_name(part) == name:
            same |= part
    joined = _components(_grow(same, bridge))  # parts within 2·bridge pixels of each other share a label
    anchor = joined[labels == largest][0]
    return same & (joined == anchor), background


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component."""
    if not mask.any():
        return mask
    labels = _components(mask)
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[np.argmax(counts)]


def _components(mask: np.ndarray) -> np.ndarray:
    """A label for every pixel of ``mask`` (-1 elsewhere), the same within each 4-connected component and different
    between components, by iterated union of labels along rows and columns (numpy only)."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(h * w).reshape(h, w), -1)
    big = h * w + 1
    while True:  # propagate the minimum label through 4-neighbours until nothing changes
        lab = np.where(mask, labels, big)
        new = lab.copy()
        new[1:] = np.minimum(new[1:], np.where(mask[:-1] & mask[1:], lab[:-1], big))
        new[:-1] = np.minimum(new[:-1], np.where(mask[1:] & mask[:-1], lab[1:], big))
        new[:, 1:] = np.minimum(new[:, 1:], np.where(mask[:, :-1] & mask[:, 1:], lab[:, :-1], big))
        new[:, :-1] = np.minimum(new[:, :-1], np.where(mask[:, 1:] & mask[:, :-1], lab[:, 1:], big))
        new = np.where(mask, new, -1)
        # pointer jumping: each label takes its own label's label, which makes long chains converge fast
        flat = new.ravel()
        valid = flat >= 0
        flat[valid] = flat[flat[valid]]
        new = np.where(mask, np.minimum(flat.reshape(h, w), new), -1)
        if np.array_equal(new, labels):
            return labels
        labels = new


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, np.asarray(points, dtype=np.float64).tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        out: list[tuple[float, float]] = []
        for px, py in seq:
            while len(out) >= 2:
                (ax, ay), (bx, by) = out[-2], out[-1]
                if (bx - ax) * (py - ay) - (by - ay) * (px - ax) > 0:
                    break
                out.pop()
            out.append((px, py))
        return out

    hull = np.array(half(pts)[:-1] + half(pts[::-1])[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _row_extremes(mask: np.ndarray) -> np.ndarray:
    """The corners of the leftmost and rightmost pixel of every row: the convex hull of these is the hull of the
    region's pixels (as squares), from about 4·rows points instead of every pixel."""
    rows = np.nonzero(mask.any(1))[0]
    left = mask[rows].argmax(1)
    right = mask.shape[1] - 1 - mask[rows, ::-1].argmax(1)
    xs = np.concatenate([left, left, right + 1, right + 1])
    ys = np.concatenate([rows, rows + 1, rows, rows + 1])
    return np.stack([xs, ys], 1)


def classify_shape(solidity: float, fill: float, disk_overlap: float, square_overlap: float) -> str:
    """A star is the only concave shape; a triangle fills half its bounding box; a circle and a square are told
    apart by which of the two ideal shapes of the region's own area and centroid overlaps it more.

    Not by bounding-box fill (π/4 against 1), which is what a clean drawing would allow: one stray bump on an edge
    widens the box and a square then reads as a circle. On clean squares with rounded corners the two tests agree
    (both call them circles from a corner radius of about a third of the side); the overlaps also hold when the
    edges wobble, as a generated picture's do.
    """
    if solidity < 0.8:
        return "star"
    if fill < 0.64:
        return "triangle"
    return "square" if square_overlap > disk_overlap else "circle"


def _template_overlaps(mask: np.ndarray, cx: float, cy: float) -> tuple[float, float]:
    """(disk, square) intersection over union of ``mask`` with the disk and the axis-aligned square of its own area
    centred on (cx, cy), in pixels, pixel centres at half-integers."""
    area = float(mask.sum())
    ys, xs = np.ogrid[: mask.shape[0], : mask.shape[1]]
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy

    def overlap(template: np.ndarray) -> float:
        return float((mask & template).sum()) / float((mask | template).sum())

    half_side = math.sqrt(area) / 2
    return overlap(dx * dx + dy * dy <= area / math.pi), overlap((np.abs(dx) <= half_side) & (np.abs(dy) <= half_side))


def _grow(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """``mask`` dilated by a 3×3 square ``steps`` times (nothing wraps around the image's edges)."""
    out = mask.copy()
    for _ in range(steps):
        g = out.copy()
        g[1:] |= out[:-1]
        g[:-1] |= out[1:]
        out = g.copy()
        out[:, 1:] |= g[:, :-1]
        out[:, :-1] |= g[:, 1:]
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every part of its complement that no 4-connected path links to the image's border added."""
    free = ~mask
    outside = np.zeros_like(mask)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        outside[edge] = free[edge]
    while True:  # flood the background from the border
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def enclosed_region(mask: np.ndarray, bridge: int = 3) -> np.ndarray:
    """The shape's region with whatever its outline encloses filled in: ``mask`` closed by ``bridge`` pixels (so a
    gap of up to about 2·bridge pixels in a drawn ring still encloses), its holes filled, the closing undone."""
    closed = _fill_holes(_grow(mask, bridge))
    return mask | ~_grow(~closed, bridge)


def hollowness(mask: np.ndarray) -> tuple[float, np.ndarray]:
    """(share of the enclosed region that is not the shape, the enclosed region): about 0 for a filled shape, and
    for an outline the area of its hole against the whole (0.5 for a ring a sixth as wide as the disk)."""
    region = enclosed_region(mask)
    return 1.0 - float(mask.sum()) / max(float(region.sum()), 1.0), region


def analyse(image, threshold: float = 60.0) -> Analysis:
    """Read background colour, shape colour, position, size, shape and style (filled or outline) from an RGB image
    (PIL or H×W×3 uint8). An outline's colour is that of its stroke; its position, size and shape are read from the
    region it encloses (so a ring reads as a circle, at its centre)."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    h, w = pixels.shape[:2]
    mask, background = shape_region(pixels, threshold)
    bg_name = nearest_colour(background)
    area = int(mask.sum())
    if area < 0.002 * h * w:
        return Analysis(bg_name, None, None, None, None, area / (h * w), (math.nan, math.nan), math.nan, math.nan,
                        math.nan, math.nan, (0, 0, 0))
    rgb = np.median(pixels[mask].astype(np.float64), axis=0)
    hollow, region = hollowness(mask)
    style = "outline" if hollow > HOLLOW_CUT else "filled"
    if style == "outline":
        # a thin stroke is mostly edge, where the colour blends into the background: its colour is the median of
        # the half of its pixels furthest from the background; and the shape is what the stroke encloses
        stroke = pixels[mask].astype(np.float64)
        distance = np.sqrt(((stroke - background) ** 2).sum(-1))
        rgb = np.median(stroke[distance >= np.median(distance)], axis=0)
        mask, area = region, int(region.sum())
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    disk_overlap, square_overlap = _template_overlaps(mask, cx * w, cy * h)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    solidity = area / max(_hull_area(_row_extremes(mask)), 1.0)
    fill = area / box
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / w
    return Analysis(
        background=bg_name, colour=nearest_colour(rgb), position=nearest_position(cx, cy),
        shape=classify_shape(solidity, fill, disk_overlap, square_overlap),
        size="large" if extent > SIZE_CUT else "small", area=area / (h * w), centroid=(float(cx), float(cy)),
        solidity=float(solidity), fill=float(fill), disk_overlap=disk_overlap, square_overlap=square_overlap,
        rgb=tuple(int(round(v)) for v in rgb), hollow=hollow, style=style,
    )


GRADED = ("colour", "position", "shape", "size", "background")  # what ``grade`` checks, in this order


def grade(scene: Scene, found: Analysis) -> dict[str, bool]:
    return {key: getattr(found, key) == getattr(scene, key) for key in GRADED}
