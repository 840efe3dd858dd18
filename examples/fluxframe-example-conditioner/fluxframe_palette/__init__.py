"""A fluxframe plugin: ``palette`` lays out colours as a Flex.2 control hint (left-to-right bands, or top-to-bottom).

    [[conditioners]]                 # or per request: --cond palette.colors='["#1d3557", "#e63946"]'
    name = "palette"
    colors = ["#1d3557", "#f1faee", "#e63946"]
    strength = 0.6
"""

from PIL import Image, ImageColor

from fluxframe.plugin import ChannelStop, Conditioner, RequestError, check_stop, check_strength, hookimpl


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
        self.strength, self.stop = check_strength(strength, self.name), check_stop(stop, self.name)
        self.direction, self.options = direction, dict(colors=colors, strength=strength, stop=stop, direction=direction)

    def layout(self, width, height):
        """The hint image: one band per colour."""
        bands = Image.new("RGB", (len(self.colors), 1))
        bands.putdata(self.colors)
        if self.direction == "vertical":
            bands = bands.transpose(Image.Transpose.ROTATE_270)
        return bands.resize((width, height), Image.Resampling.NEAREST)

    def prepare(self, model, request, inputs, conditioning):
        from fluxframe.plugin import from_pil, require_channels  # from_pil loads torch: imported where needed

        if inputs:  # a request's own values (--cond palette.colors=...) override the configured ones
            try:
                palette = type(self)(**{**self.options, **inputs})
            except (TypeError, ValueError) as exc:
                raise RequestError(str(exc), field="conditioning.palette") from None
            return palette.prepare(model, request, {}, conditioning)
        model = require_channels(model, self.name, "control")  # a RequestError for a model without them
        if "control" in conditioning.channels:
            raise RequestError("the control channels are already set (use palette or control, not both)",
                               field="conditioning.palette")
        control = model.encode_tokens(from_pil(self.layout(request.width, request.height))) * self.strength
        conditioning.channels["control"] = control
        conditioning.step_hooks.append(ChannelStop("control", control, self.stop))
        conditioning.info[self.name] = {"colors": self.colors, "strength": self.strength, "stop": self.stop}


@hookimpl
def register_conditioners(register):
    register("palette", PaletteConditioner)
