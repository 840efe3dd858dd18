"""Built-in samplers: the flow-matching Euler integrator FLUX models are trained for; and the sampler-side step
cache (``[sampler.cache]``, see fluxframe.plugins.stepcache), registered here beside it."""

from __future__ import annotations

from fluxframe.core.hookspecs import hookimpl
from fluxframe.core.interfaces import Sampler


class FlowEuler(Sampler):
    """x ← x + (σ_next − σ)·v, accumulated in fp32 whatever the model's dtype."""

    name = "flow-euler"
    takes_step_cache = True  # one model call per step, in order

    def sample(self, x, sigmas, velocity, callback=None):
        from fluxframe.core.types import StepInfo

        x = x.float()
        steps = len(sigmas) - 1
        for i in range(steps):
            v = velocity(x, sigmas[i], i)
            x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
            if callback is not None:
                callback(StepInfo(step=i + 1, num_steps=steps, sigma=float(sigmas[i + 1]), latents=x))
        return x


@hookimpl(trylast=True)
def register_samplers(register):
    register("flow-euler", FlowEuler)


@hookimpl(trylast=True)
def register_step_caches(register):
    from .stepcache import FirstBlockCache, TeaCache

    register("first-block", FirstBlockCache)
    register("teacache", TeaCache)
