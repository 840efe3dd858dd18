"""Universal control: a line, pose or depth map steering the layout, as the model's "control" channels.

Works with any model family that is ``ChannelConditioned`` with a "control" group (Flex.2: channels 132–195 of
every token) and uses nothing else of it. The control image is preprocessed (``kind``: "map" = use as given,
"line" = OpenCV edges of a photo, "depth" / "pose" = an ONNX estimator from the config; see ``preprocess.py``),
resized to the output size, encoded into the model's token layout (``encode_tokens``: VAE-encoded, normalised,
packed) and multiplied by ``strength``. ``stop`` ∈ [0, 1]: steps
i < int(N·stop) see the control, later ones see the control channels zeroed (inpaint and mask stay). Strength 0
gives exactly the input without control; without this conditioner the control channels are zeros (not the
encoding of a black image). Works with or without ``inpaint``.

Inputs (``request.conditioning["control"]``, or ``--control`` ...): ``{"image", "kind", "strength", "stop"}``;
all but the image default to the conditioner's options. Options (``[[conditioners]] name = "control"``):
``kind`` ("map"), ``strength`` (1.0), ``stop`` (1.0), ``depth_model`` / ``pose_model`` (ONNX files),
``line_low`` / ``line_high`` (Canny thresholds, 100 / 200), ``posterior`` ("mode" or "sample").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fluxframe.core.channels import ChannelStop, check_stop, check_strength, require_channels
from fluxframe.core.images import open_image
from fluxframe.core.interfaces import Conditioner
from fluxframe.errors import RequestError

from .inpaint import check_posterior, posterior_generator
from .preprocess import PREPROCESSORS, fit

FIELD = "conditioning.control"
SEED_OFFSET = 0xC0271


class ControlConditioner(Conditioner):
    """``control``: the control channels (see the module docstring)."""

    name = "control"
    families = ("flex2",)
    file_inputs = ("image",)

    def __init__(self, kind: str = "map", strength: float = 1.0, stop: float = 1.0, depth_model: str | None = None,
                 pose_model: str | None = None, line_low: int = 100, line_high: int = 200, posterior: str = "mode",
                 base_dir: Path | None = None):
        self.kind = self._check_kind(kind, ValueError)
        self.strength, self.stop = check_strength(strength, self.name), check_stop(stop, self.name)
        self.posterior = check_posterior(self.name, posterior)
        # relative model paths resolve against the config file's folder, like every path in a config
        self.models = {k: None if p is None else (Path(base_dir or ".") / Path(p).expanduser())
                       for k, p in (("depth", depth_model), ("pose", pose_model))}
        for key, path in self.models.items():
            if path is not None and not path.is_file():
                raise ValueError(f"control: {key}_model {str(path)!r} does not exist")
        self.preprocessors = {"map": PREPROCESSORS["map"](), "line": PREPROCESSORS["line"](line_low, line_high)}

    @staticmethod
    def _check_kind(kind: Any, error: type) -> str:
        if kind not in PREPROCESSORS:
            message = f"control: kind must be one of {', '.join(PREPROCESSORS)}, got {kind!r}"
            raise error(message) if error is ValueError else error(message, field=f"{FIELD}.kind")
        return kind

    def preprocessor(self, kind: str):
        if kind not in self.preprocessors:
            try:
                self.preprocessors[kind] = PREPROCESSORS[kind](self.models.get(kind))
            except ValueError as exc:
                raise RequestError(str(exc), field=f"{FIELD}.{kind}_model") from None
        return self.preprocessors[kind]

    def settings(self, inputs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(inputs) - {"image", "kind", "strength", "stop"})
        if unknown:
            raise RequestError(f"unknown input {unknown[0]!r} (the control conditioner takes image, kind, strength "
                               f"and stop)", field=f"{FIELD}.{unknown[0]}")
        if inputs.get("image") is None:
            raise RequestError("no control image given", field=f"{FIELD}.image")
        out = {"kind": self._check_kind(inputs.get("kind", self.kind), RequestError)}
        for key, check, default in (("strength", check_strength, self.strength), ("stop", check_stop, self.stop)):
            try:
                out[key] = check(inputs.get(key, default), self.name)
            except ValueError as exc:
                raise RequestError(str(exc), field=f"{FIELD}.{key}") from None
        return out

    def control_image(self, inputs: dict[str, Any]):
        settings = self.settings(inputs)
        photo = open_image(inputs["image"], f"{FIELD}.image")
        return self.preprocessor(settings["kind"])(photo), settings

    def input_images(self, inputs: dict[str, Any]) -> list:
        if not inputs:
            return []
        self.settings(inputs)
        return [open_image(inputs["image"], f"{FIELD}.image").convert("RGB")]

    def prepare(self, model, request, inputs, conditioning) -> None:
        if not inputs:
            return
        import torch

        from fluxframe.core.images import from_pil

        model = require_channels(model, self.name, "control")
        if "control" in conditioning.channels:
            raise RequestError("the control channels were already set by another conditioner", field=FIELD)
        control_map, settings = self.control_image(inputs)
        notes: list[str] = []
        control_map = fit(control_map, request.width, request.height, f"{FIELD}.image", notes)
        if settings["strength"] == 0.0:  # exactly the no-control input, without running the VAE
            rows, cols = model.token_grid(request.width, request.height)
            control = torch.zeros((1, rows * cols, model.channel_groups["control"]))
        else:
            control = model.encode_tokens(from_pil(control_map),
                                          posterior_generator(self.posterior, request.seed, SEED_OFFSET))
            control = control * settings["strength"]
        conditioning.channels["control"] = control
        conditioning.step_hooks.append(ChannelStop("control", control, settings["stop"]))
        conditioning.info[self.name] = {**settings, "size": list(control_map.size), "notes": notes,
                                        "steps_with_control": f"first int(N·{settings['stop']:g})"}
