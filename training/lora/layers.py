"""The in-memory LoRA: `LoraLayer` (one low-rank update) and `LoraFile` (layers by canonical module name).

Canonical names are diffusers module paths with a component prefix
(`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
`text_encoder.encoder.layers.0.self_attn.q_proj`); each layer's `delta W = alpha / rank * up @ down`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..embedding import META_TOKENS, META_TRIGGER, META_VECTORS


@dataclass
class LoraLayer:
    """One low-rank update: `down` [r, in(, kh, kw)], `up` [out, r(, 1, 1)], in the file's dtype.

    DoRA layers also carry `magnitude` [out]: the weight becomes `(W0 + delta) * magnitude / norm`
    row by row, where `norm` is |W0| (`magnitude_norm="base"`: a kohya `dora_scale` as ComfyUI's
    LoraLoader applies it) or |W0 + delta| (`"adapted"`: peft's `lora_magnitude_vector`).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None
    magnitude_norm: str = "base"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def kind(self) -> str:
        return "conv" if self.down.ndim == 4 else "linear"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this layer changes."""
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight change `alpha / rank * up @ down`, shaped like the weight."""
        product = self.up.reshape(self.up.shape[0], -1).to(dtype) @ self.down.reshape(self.rank, -1).to(dtype)
        return (product * self.scale).reshape(self.shape)

    def weight_change(self, base: torch.Tensor) -> torch.Tensor:
        """What this layer adds to the base weight `base` (float32): `delta`, or for DoRA the
        rescaled weight minus `base`."""
        delta = self.delta(torch.float32)
        if self.magnitude is None:
            return delta
        base = base.float()
        adapted = base + delta
        norm = _row_norms(base if self.magnitude_norm == "base" else adapted)
        return adapted * (self.magnitude.float() / norm).reshape(-1, *[1] * (base.ndim - 1)) - base

    def with_base_norm(self, base: torch.Tensor) -> LoraLayer:
        """The same DoRA layer with its magnitude over |W0| (the kohya `dora_scale` ComfyUI applies)."""
        if self.magnitude is None or self.magnitude_norm == "base":
            return self
        base = base.float()
        ratio = _row_norms(base) / _row_norms(base + self.delta(torch.float32))
        return LoraLayer(self.down, self.up, self.alpha, (self.magnitude.float() * ratio).to(self.magnitude.dtype), "base")


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    """One L2 norm per output channel (peft's DoRA norm; ComfyUI's for an output-axis dora_scale)."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1)


@dataclass
class LoraFile:
    """A LoRA read from any supported format; `unmapped` says why each leftover key was left."""

    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "kohya"
    family: str = "sd15"  # the SD1.5-family layout the shapes fit (a key of models.FAMILY_CONFIGS)
    unmapped: dict[str, str] = field(default_factory=dict)  # file key -> reason
    notes: list[str] = field(default_factory=list)  # assumptions made while reading
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # bundled token embeddings: trigger -> [N, d]

    def without_embeddings(self) -> LoraFile:
        """The same LoRA without its bundled embeddings, nor the metadata that says it carries one
        (diffusers' `load_lora_weights` refuses `bundle_emb.*` keys)."""
        meta = {k: v for k, v in self.metadata.items() if k not in (META_TRIGGER, META_VECTORS, META_TOKENS)}
        return replace(self, metadata=meta, embeddings={})

    def components(self) -> dict[str, int]:
        counts = {"unet": 0, "text_encoder": 0}
        for name in self.layers:
            counts[name.split(".", 1)[0]] += 1
        return counts
