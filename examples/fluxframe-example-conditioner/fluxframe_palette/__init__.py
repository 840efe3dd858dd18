"""A fluxframe plugin: ``palette`` lays out colours as a Flex.2 control hint (left-to-right bands, or top-to-bottom).

    [[conditioners]]
    name = "palette"
    colors = ["#1d3557", "#f1faee", "#e63946"]
    strength = 0.6
    stop = 0.4
"""

from PIL import Image, ImageColor

from fluxframe.conditioning.control import ControlStop, check_stop, check_strength
from fluxframe.core.hookspecs import hookimpl
from fluxframe.core.interfaces import Conditioner
from fluxframe.errors import RequestError


class PaletteConditioner(Conditioner):
    name = "palette"
    families = ("flex2",)  # it fills Flex.2's control channels

    def __init__(self, colors=("#000000", "#ffffff"), strength=0.5, stop=0.5, direction="horizontal"):
        if not isinstance(colors, (list, tuple)) or not colors:
            raise ValueError(f"palette: colors must be a non-empty list of colours, got {colors!r}")
        try:
            self.colors = [ImageColor.getrgb(c) for c in colors]
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"palette: colors: {exc}") from None
        if direction not in ("horizontal", "vertical"):
            raise ValueError(f"palette: direction must be horizontal or vertical, got {direction!r}")
        self.strength, self.stop, self.direction = check_strength(strength), check_stop(stop), direction

    def layout(self, width, height):
        """The hint image: one band per colour."""
        bands = Image.new("RGB", (len(self.colors), 1))
        bands.putdata(self.colors)
        if self.direction == "vertical":
            bands = bands.transpose(Image.Transpose.ROTATE_270)
        return bands.resize((width, height), Image.Resampling.NEAREST)

    def prepare(self, model, request, inputs, conditioning):
        from fluxframe.conditioning.preprocess import rgb_tensor
        from fluxframe.plugins.flex2.family import pack

        if "control" in conditioning.channels:
            raise RequestError("the control channels are already set (use palette or control, not both)",
                               field="conditioning.palette")
        control = pack(model.encode_latents(rgb_tensor(self.layout(request.width, request.height)))) * self.strength
        conditioning.channels["control"] = control
        conditioning.step_hooks.append(ControlStop(control, self.stop))
        conditioning.info[self.name] = {"colors": self.colors, "strength": self.strength, "stop": self.stop}


@hookimpl
def register_conditioners(register):
    register("palette", PaletteConditioner)
