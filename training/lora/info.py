"""`lora info`: what a LoRA file holds, as a few lines of text."""
from __future__ import annotations

import os
from pathlib import Path

from ..embedding import Embedding
from ..embedding import describe as describe_embedding
from ..models import FAMILY_NAMES
from .read import read_lora


def lora_info(path: str | os.PathLike) -> str:
    """What a LoRA file holds: format, base, modules, ranks, alpha, metadata, what does not map."""
    lora = read_lora(path)
    counts = lora.components()
    ranks: dict[int, int] = {}
    alphas: dict[float, int] = {}
    for layer in lora.layers.values():
        ranks[layer.rank] = ranks.get(layer.rank, 0) + 1
        alphas[round(layer.alpha, 4)] = alphas.get(round(layer.alpha, 4), 0) + 1
    conv = sum(layer.kind == "conv" and layer.down.shape[2:] != (1, 1) for layer in lora.layers.values())
    first = next(iter(lora.layers.values()))
    family = FAMILY_NAMES.get(lora.family, lora.family)
    lines = [
        f"{Path(path).name}",
        f"  format:    {lora.source_format}",
        f"  base:      {family}",
        f"  modules:   {counts['unet']} UNet, {counts['text_encoder']} text encoder ({conv} of them 3x3 convs)",
        "  rank:      " + ", ".join(f"{r} ({n} layers)" for r, n in sorted(ranks.items())),
        "  alpha:     " + ", ".join(f"{a:g} ({n} layers)" for a, n in sorted(alphas.items())),
        f"  dtype:     {str(first.down.dtype).removeprefix('torch.')}",
    ]
    dora = sum(layer.magnitude is not None for layer in lora.layers.values())
    variant = lora.metadata.get("dreambooth.lora_variant", "dora" if dora else "lora")
    lines.append(f"  variant:   {variant}" + (f" ({dora} layers with a DoRA magnitude)" if dora else ""))
    lines += [f"  note:      {note}" for note in lora.notes]
    lines += [f"  embedding: {describe_embedding(Embedding(name, vectors))}" for name, vectors in lora.embeddings.items()]
    if lora.unmapped:
        lines.append(f"  not mapped: {len(lora.unmapped)} keys")
        by_reason: dict[str, list[str]] = {}
        for key, reason in lora.unmapped.items():
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            lines.append(f"    {len(keys)} x {reason}: {keys[0]}" + (" ..." if len(keys) > 1 else ""))
    else:
        lines.append("  not mapped: none (every key maps to an SD1.5 layer)")
    if lora.metadata:
        lines.append("  metadata:")
        for key in sorted(lora.metadata):
            value = " ".join(str(lora.metadata[key]).split())
            lines.append(f"    {key}: {value[:100]}{' ...' if len(value) > 100 else ''}")
    return "\n".join(lines)
