"""Learned token embeddings (textual inversion, pivotal tuning): the trigger word as N new tokens.

Files:
- bundled in a LoRA, as A1111/Forge read it (extensions-builtin/Lora/networks.py, `load_network`:
  a key `bundle_emb.<name>.string_to_param.<k>` becomes embedding <name>): `bundle_emb.<token>.string_to_param.*`
  = [N, 768];
- standalone, `<stem>_embedding.safetensors` with `emb_params` = [N, 768] (A1111's and kohya's key; ComfyUI's
  `embedding:<name>` and diffusers' `load_textual_inversion` read a one-tensor file whatever its key).
Metadata in both: the trigger word and the number of vectors.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

BUNDLE_PREFIX = "bundle_emb."
EMBEDDING_KEY = "emb_params"
META_TRIGGER = "dreambooth.embedding_trigger"
META_VECTORS = "dreambooth.embedding_vectors"
META_TOKENS = "dreambooth.embedding_tokens"


@dataclass
class Embedding:
    """A trigger word and the vectors that stand for it in the text encoder's input."""

    trigger: str
    vectors: torch.Tensor  # [N, d]

    @property
    def token_names(self) -> list[str]:
        return token_names(self.trigger, len(self.vectors))

    def metadata(self) -> dict[str, str]:
        return {META_TRIGGER: self.trigger, META_VECTORS: str(len(self.vectors)),
                META_TOKENS: " ".join(self.token_names)}


def token_names(trigger: str, count: int) -> list[str]:
    """The new tokens the trigger word becomes: `<sks_0>`, `<sks_1>`, ..."""
    return [f"<{trigger}_{i}>" for i in range(count)]


def with_new_tokens(text: str, trigger: str, names: list[str]) -> str:
    """The text with each whole-word trigger replaced by the new tokens ("a photo of <sks_0> <sks_1> man")."""
    return re.sub(rf"(?<![\w<]){re.escape(trigger)}(?![\w>])", " ".join(names), text)


# ---------------------------------------------------------------- the text encoder side


class TokenEmbedding(torch.nn.Module):
    """A text encoder's token table with new rows held apart: ids past the base vocabulary read `extra`.
    The base table is never changed (nor given to an optimizer), so every other token stays bit-identical."""

    def __init__(self, base: torch.nn.Embedding, extra: torch.Tensor):
        super().__init__()
        self.base = base
        self.extra = torch.nn.Parameter(extra)
        self.vocab = base.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.vocab
        out = self.base(ids.clamp(max=self.vocab - 1))
        if not bool(new.any()):
            return out
        rows = self.extra[(ids - self.vocab).clamp(min=0)].to(out.dtype)
        return torch.where(new[..., None], rows, out)


def attach(model, embedding: Embedding, trainable: bool = False) -> TokenEmbedding:
    """Give `model` (an SDModel) the embedding's tokens: a tokenizer copy that knows them and the text
    encoder's token table wrapped in a `TokenEmbedding`. Returns that module (its `extra` is the vectors)."""
    tokenizer = copy.deepcopy(model.tokenizer)
    names = embedding.token_names
    vocab = len(tokenizer)
    base = model.text_encoder.get_input_embeddings()
    if isinstance(base, TokenEmbedding) or vocab != base.num_embeddings:
        raise UserError("The text encoder already has added tokens; load the base model again to use this "
                        "embedding.")
    tokenizer.add_tokens(names)
    if tokenizer.convert_tokens_to_ids(names) != list(range(vocab, vocab + len(names))):
        raise UserError(f"The tokens {names[0]}... collide with the tokenizer's own; choose another trigger word.")
    vectors = embedding.vectors.detach().to(base.weight.device, torch.float32).clone()
    module = TokenEmbedding(base, vectors)
    module.extra.requires_grad_(trainable)
    model.text_encoder.set_input_embeddings(module)
    model.tokenizer = tokenizer
    return module


def initial_vectors(text_encoder, count: int, seed: int) -> torch.Tensor:
    """New tokens start random at the scale of the table's own rows (std of all its values), as diffusers'
    advanced DreamBooth script does; deterministic from the seed."""
    table = text_encoder.get_input_embeddings().weight.detach().float()
    generator = torch.Generator().manual_seed(seed + 17)
    return torch.randn((count, table.shape[1]), generator=generator) * table.std()


# ---------------------------------------------------------------- files


def bundle_key(name: str) -> str:
    return f"{BUNDLE_PREFIX}{name}.string_to_param.*"


def bundled_tensors(embedding: Embedding, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The keys a LoRA file carries its embedding under (A1111's bundle format)."""
    return {bundle_key(embedding.trigger): embedding.vectors.detach().to("cpu", dtype).contiguous()}


def read_bundled(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict[str, Embedding]:
    """Embeddings bundled in a LoRA state dict, parsed the way A1111's `load_network` does: the key splits at
    its first dot into `bundle_emb` and the rest, whose first part is the embedding's name."""
    found: dict[str, Embedding] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head != "bundle_emb" or "." not in rest:
            continue
        name, vec_name = rest.split(".", 1)
        if vec_name.split(".")[0] == "string_to_param" and value.ndim == 2:
            found[name] = Embedding(name, value.float())
    return found


def write_embedding_file(embedding: Embedding, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                         dtype: torch.dtype = torch.float16) -> Path:
    """The standalone embedding file (`emb_params`), written atomically."""
    from .safe_io import atomic_save_safetensors

    tensors = {EMBEDDING_KEY: embedding.vectors.detach().to("cpu", dtype).contiguous()}
    return atomic_save_safetensors(tensors, path, (metadata or {}) | embedding.metadata())


def read_embedding_file(path: str | os.PathLike, trigger: str | None = None) -> Embedding:
    """A one-tensor embedding file ([N, d] or [d]); the trigger from its metadata, else `trigger`, else the file stem."""
    from safetensors.torch import load_file

    from .safe_io import read_metadata

    path = Path(path)
    state = load_file(str(path))
    if len(state) != 1:
        raise UserError(f"{path.name} holds {len(state)} tensors; an embedding file holds one ([vectors, 768]).")
    vectors = next(iter(state.values())).float()
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    name = read_metadata(path).get(META_TRIGGER) or trigger or path.stem
    return Embedding(name, vectors)


def embedding_path(output: str | os.PathLike) -> Path:
    """Where the standalone file goes beside a LoRA: `<stem>_embedding.safetensors`."""
    output = Path(output)
    return output.with_name(f"{output.stem}_embedding.safetensors")


def describe(embedding: Embedding) -> str:
    """One line for `lora info`: name, vectors, their norms."""
    norms = embedding.vectors.float().norm(dim=1)
    return (f"{embedding.trigger} ({len(embedding.vectors)} vectors of {embedding.vectors.shape[1]}, tokens "
            f"{' '.join(embedding.token_names)}; norm " + ", ".join(f"{n:.3g}" for n in norms.tolist()) + ")")
