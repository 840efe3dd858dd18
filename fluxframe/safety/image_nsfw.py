"""The image NSFW filter: NudeNet's detector (the ONNX model the ``nudenet`` package ships) run through
onnxruntime directly, with a threshold per body-part class.

A class's score is the highest confidence any detection box gives that class (before NudeNet's own 0.2
floor and box suppression, which only matter for drawing boxes). By default the exposed genitalia,
anus, female breast and buttocks classes are enforced; every class is scored and recorded.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from fluxframe.core.interfaces import Filter, Verdict
from fluxframe.errors import ConfigError, SafetyError
from fluxframe.safety import options as opt

NAME = "image-nsfw"
IMAGE_TARGETS = frozenset({"input_image", "output_image"})

# The detector's output classes, in the model's order (nudenet 3.4, 320n.onnx).
CLASSES = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)
DEFAULT_THRESHOLDS = {
    "FEMALE_GENITALIA_EXPOSED": 0.5,
    "MALE_GENITALIA_EXPOSED": 0.5,
    "ANUS_EXPOSED": 0.5,
    "FEMALE_BREAST_EXPOSED": 0.5,
    "BUTTOCKS_EXPOSED": 0.6,
}
OPTIONS = ("thresholds", "model", "resolution", "threads")


def default_model_path() -> Path | None:
    """320n.onnx inside the installed nudenet package (found without importing it)."""
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "320n.onnx"
    return path if path.is_file() else None


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def preprocess(image: Any, size: int) -> np.ndarray:
    """PIL image -> (1, 3, size, size) float32 in [0, 1], RGB: padded to a square at the bottom/right with
    black, then resized (bilinear), exactly as NudeNet prepares an RGB array."""
    import cv2
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError("empty image")
    rgb = np.asarray(image.convert("RGB"))  # alpha is dropped, so content hidden behind transparency is seen
    h, w = rgb.shape[:2]
    side = max(h, w)
    if h != w:
        rgb = cv2.copyMakeBorder(rgb, 0, side - h, 0, side - w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    small = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(small.transpose(2, 0, 1)[None], dtype=np.float32) / np.float32(255.0)


class ImageNSFWFilter(Filter):
    name = NAME
    version = "1.0"
    targets = IMAGE_TARGETS

    def __init__(self, *, base_dir: str | Path | None = None, **options: Any):
        opt.reject_unknown(NAME, options, OPTIONS)
        thresholds: dict[str, float] = dict(DEFAULT_THRESHOLDS)
        given = options.get("thresholds", {})
        if not isinstance(given, dict):
            raise ConfigError("must be a table: CLASS = threshold (or false to stop enforcing a class)",
                              key=opt.key(NAME, "thresholds"))
        for cls, value in given.items():
            if cls not in CLASSES:
                raise ConfigError(f"unknown class (known: {', '.join(CLASSES)})", key=opt.key(NAME, "thresholds", cls))
            if value is False:
                thresholds.pop(cls, None)
            else:
                thresholds[cls] = opt.number(NAME, f"thresholds.{cls}", value, low=0, high=1, low_open=True)
        self.thresholds = {cls: thresholds[cls] for cls in CLASSES if cls in thresholds}

        self.resolution = int(opt.number(NAME, "resolution", options.get("resolution", 320), low=64, high=2048))
        if self.resolution % 32:
            raise ConfigError(f"must be a multiple of 32, got {self.resolution}", key=opt.key(NAME, "resolution"))
        threads = options.get("threads")
        if threads is not None:
            threads = int(opt.number(NAME, "threads", threads, low=1, high=256))

        if "model" in options:
            model = opt.path(NAME, "model", options["model"], base_dir)
        else:
            model = default_model_path()
            if model is None:  # a missing dependency, not a config mistake: an optional filter degrades
                raise SafetyError("the nudenet package (which ships 320n.onnx) is not installed; install it or "
                                  f"set {opt.key(NAME, 'model')} to a NudeNet ONNX file", filter=NAME)
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.model_path = model
        self.session = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        output = self.session.get_outputs()[0]
        if len(inputs) != 1 or (isinstance(output.shape[1], int) and output.shape[1] != 4 + len(CLASSES)):
            raise ConfigError(f"{model} is not a NudeNet detector (expected 1 input and {4 + len(CLASSES)} output "
                              f"channels, got {output.shape})", key=opt.key(NAME, "model"))
        self.input_name = inputs[0].name
        self.version = f"1.0+{model.name}.{_file_digest(model)[:12]}@{self.resolution}"

    def scores(self, image: Any) -> dict[str, float]:
        """Per-class score: the highest confidence of any box for that class."""
        blob = preprocess(image, self.resolution)
        out = self.session.run(None, {self.input_name: blob})[0]  # (1, 4 + classes, boxes)
        if out.ndim != 3 or out.shape[1] != 4 + len(CLASSES):
            raise RuntimeError(f"unexpected detector output shape {out.shape}")
        best = out[0, 4:, :].max(axis=1) if out.shape[2] else np.zeros(len(CLASSES), np.float32)
        return {cls: float(best[i]) for i, cls in enumerate(CLASSES)}

    def check_image(self, image: Any, target: str = "output_image") -> Verdict:
        scores = self.scores(image)
        over = sorted(((scores[c] - t, c) for c, t in self.thresholds.items() if scores[c] >= t), reverse=True)
        rounded = {k: round(v, 4) for k, v in scores.items()}
        if over:
            worst = over[0][1]
            found = ", ".join(f"{c} {scores[c]:.2f} >= {self.thresholds[c]:.2f}" for _, c in over)
            return Verdict(filter=self.name, version=self.version, allowed=False, target=target, scores=rounded,
                           threshold=self.thresholds[worst], reason=found, action="block")
        top = max(self.thresholds, key=lambda c: scores[c] / self.thresholds[c], default=None)
        reason = (f"highest enforced class {top} {scores[top]:.2f} < {self.thresholds[top]:.2f}" if top
                  else "no class is enforced")
        return Verdict(filter=self.name, version=self.version, allowed=True, target=target, scores=rounded,
                       threshold=self.thresholds[top] if top else None, reason=reason, action="allow")

    def check_prompt(self, text: str, target: str) -> Verdict:
        raise NotImplementedError("image-nsfw checks images only")
