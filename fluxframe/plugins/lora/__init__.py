"""LoRA adapters for the FLUX.2 and Flex.2 DiTs, from ``[[lora]]`` config entries or ``--lora PATH[:WEIGHT]``.

``formats`` reads the published key layouts (diffusers/PEFT, kohya, ai-toolkit), ``targets`` maps their layer
names onto fluxframe's modules through the family's own key table, ``layers`` fuses the updates into the
weights (with an exact unfuse) or runs them as a side path (quantised layers). A family takes LoRAs by
mixing in ``LoraSupport`` and naming its key table in ``lora_rules``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .formats import LoraFile, LoraLayer, load_lora, read_lora
from .layers import MODES, AppliedLoras, LoraLinear, LoraSpec, apply_loras, fuse, unfuse
from .targets import Segment, lora_targets


class LoraSupport:
    """``apply_loras`` for a model family whose DiT is ``self.transformer`` (with ``config.hidden_size``),
    computing on ``self.device``."""

    name: str
    _applied: AppliedLoras | None = None

    def lora_rules(self) -> Iterable[tuple[str, tuple[str, ...], str]]:
        """The family's key table: (fluxframe key, diffusers keys, kind), as its keymap.rules yields it."""
        raise NotImplementedError

    def apply_loras(self, loras: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.remove_loras()
        if not loras:
            return []
        specs = [LoraSpec(path=Path(e["path"]), weight=e.get("weight", 1.0), mode=e.get("mode", "auto"),
                          key=e.get("key", f"lora.{i}")) for i, e in enumerate(loras)]
        targets = lora_targets(self.lora_rules(), self.transformer, self.transformer.config.hidden_size)
        self._applied = apply_loras(self.transformer, targets, specs, device=self.device, what=f"{self.name} DiT")
        self.loras = self._applied.records
        return self.loras

    def remove_loras(self) -> None:
        """Take every applied LoRA off: fused weights are restored bit for bit, side paths unwrapped."""
        if self._applied is not None:
            self._applied.remove()
        self._applied, self.loras = None, ()


__all__ = ["MODES", "AppliedLoras", "LoraFile", "LoraLayer", "LoraLinear", "LoraSpec", "LoraSupport", "Segment",
           "apply_loras", "fuse", "load_lora", "lora_targets", "read_lora", "unfuse"]
