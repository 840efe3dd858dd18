"""Control-image preprocessors for universal control (Flex.2's), and ``fit``, which inpaint and control share.

A preprocessor turns an ordinary photo into the control map the model was trained on:

* ``line`` — OpenCV Canny edges, white on black; no model needed.
* ``depth`` and ``pose`` — an estimator given as an ONNX model file in the config (``depth_model``,
  ``pose_model`` options of the ``control`` conditioner), run with onnxruntime on the CPU. The contract: one
  float32 input (1, 3, H, W), RGB in [0, 1] normalised by ``mean``/``std`` (ImageNet's by default); the first
  output is the map, (1, C, h, w), (1, h, w) or (h, w) with C = 1 or 3. It is scaled to [0, 1] by its own min
  and max and resized to the photo's size. Depth Anything / MiDaS exports (near = bright) fit as they are; a
  pose estimator must be exported with its skeleton drawing included (e.g. a DWPose renderer graph).
* ``map`` — the image already is the control map: used as given.

``PREPROCESSORS`` maps a kind to a factory ``(**options) -> callable(PIL image) -> PIL image``; code embedding
fluxframe may add entries (e.g. a torch estimator) before building the conditioner.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fluxframe.errors import RequestError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def fit(image, width: int, height: int, where: str, notes: list[str]):
    """``image`` at the output size (Lanczos), with a note when it had to be resized."""
    from PIL import Image

    if image.size == (width, height):
        return image
    w, h = image.size
    note = f"{where}: {w}×{h} resized to the output size {width}×{height}"
    if abs(w / h - width / height) > 0.01 * width / height:
        note += " (aspect ratio changed)"
    notes.append(note)
    return image.resize((width, height), Image.Resampling.LANCZOS)


def line(low: int = 100, high: int = 200) -> Callable:
    """Canny edges of a photo, white lines on black."""
    for name, value in (("line_low", low), ("line_high", high)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1000:
            raise ValueError(f"control: {name} must be an integer from 0 to 1000, got {value!r}")
    if low > high:
        raise ValueError(f"control: line_low ({low}) must not exceed line_high ({high})")

    def run(image):
        import cv2
        import numpy as np
        from PIL import Image

        gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
        edges = cv2.Canny(gray, low, high)
        return Image.fromarray(edges).convert("RGB")

    return run


class OnnxEstimator:
    """A depth or pose estimator from an ONNX file (see the module docstring for the contract)."""

    def __init__(self, model: str | Path, *, kind: str, size: int = 518, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.path = Path(model).expanduser()
        self.kind, self.size, self.mean, self.std = kind, size, mean, std
        if not self.path.is_file():
            raise ValueError(f"control: {kind}_model {str(self.path)!r} does not exist")
        self._session = None

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            try:
                self._session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise RequestError(f"cannot load the {self.kind} estimator {self.path}: {exc}",
                                   field=f"conditioning.control.{self.kind}_model") from None
        return self._session

    def __call__(self, image):
        import numpy as np
        from PIL import Image

        session = self.session
        spec = session.get_inputs()[0]
        shape = spec.shape
        h, w = (shape[2], shape[3]) if len(shape) == 4 and all(isinstance(s, int) for s in shape[2:]) \
            else (self.size, self.size)
        x = np.asarray(image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        x = ((x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).transpose(2, 0, 1)[None]
        out = np.asarray(session.run(None, {spec.name: x.astype(np.float32)})[0], dtype=np.float32)
        out = out.reshape(out.shape[-3:] if out.ndim >= 3 and out.shape[-3] in (1, 3) else out.shape[-2:])
        if out.ndim == 3:
            out = out.transpose(1, 2, 0)
        lo, hi = float(out.min()), float(out.max())
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
        pixels = (out * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        result = Image.fromarray(pixels.squeeze(-1) if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels)
        return result.convert("RGB").resize(image.size, Image.Resampling.BICUBIC)


def _estimator(kind: str):
    def factory(model: str | Path | None = None, **options):
        if model is None:
            raise ValueError(f"control: kind {kind!r} needs an estimator: set {kind}_model = \"path/to/model.onnx\" "
                             f"in the [[conditioners]] entry of the control conditioner, or pass a ready {kind} map "
                             f"with kind = \"map\"")
        return OnnxEstimator(model, kind=kind, **options)
    return factory


def _passthrough(**_):
    return lambda image: image.convert("RGB")


PREPROCESSORS: dict[str, Callable[..., Callable]] = {
    "map": _passthrough,
    "line": line,
    "depth": _estimator("depth"),
    "pose": _estimator("pose"),
}
