"""Built-in plugin: conditioners, registered through the same hook a third-party package uses.

Each conditioner lives in its own module and is imported only when registered, so torch and PIL load
only when a run needs them. Add one ``register`` line per conditioner below.
"""

from fluxframe.core.hookspecs import hookimpl


@hookimpl
def register_conditioners(register):
    from .control import ControlConditioner
    from .inpaint import InpaintConditioner
    from .reference import ReferenceConditioner

    register("reference", ReferenceConditioner)
    register("inpaint", InpaintConditioner)
    register("control", ControlConditioner)
