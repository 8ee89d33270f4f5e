"""Pivotal tuning (textual inversion + LoRA): the trigger word becomes `pivotal_tokens` new tokens whose
embedding trains with its own learning rate for the first `pivotal_frac` of the steps, then stays fixed
while the LoRA goes on. The new rows live in their own small parameter (embedding.TokenEmbedding), so
every other row of the token table stays bit-identical to the base's.

While the tokens train, the instance captions' text embeddings are computed each step (class prompts
hold no new token and stay cached); at the freeze step the instance cache is filled once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .embedding import Embedding, TokenEmbedding, attach, initial_vectors, token_names, with_new_tokens
from .examples import Batchable, text_embeddings
from .models import SDModel
from .train_config import TrainConfig


@dataclass
class Pivotal:
    module: TokenEmbedding  # its `extra` is the trained [N, d] embedding
    freeze_at: int  # the step after which the embedding stays fixed
    trigger: str

    @property
    def parameter(self) -> torch.nn.Parameter:
        return self.module.extra

    @property
    def training(self) -> bool:
        return self.module.extra.requires_grad

    def caption(self, text: str) -> str:
        """A caption or prompt with the trigger word as the new tokens."""
        return with_new_tokens(text, self.trigger, token_names(self.trigger, len(self.module.extra)))

    def embedding(self) -> Embedding:
        return Embedding(self.trigger, self.module.extra.detach().float().cpu())

    def freeze(self, instance: Batchable, text_encoder, cache: bool) -> None:
        """Stop training the embedding (no gradient: the optimizer skips it) and, when the text encoder is
        frozen, cache the instance captions' embeddings once with the final vectors."""
        self.module.extra.requires_grad_(False)
        self.module.extra.grad = None
        if cache:
            instance.embeddings = text_embeddings(text_encoder, instance.input_ids)


def freeze_step(cfg: TrainConfig) -> int:
    """The step after which the embedding stays fixed: the first `pivotal_frac` of the steps (at least one)."""
    return max(1, int(cfg.steps * cfg.pivotal_frac))


def start_pivotal(cfg: TrainConfig, model: SDModel) -> Pivotal | None:
    """Add the new tokens to `model` (tokenizer copy, wrapped token table), initialised from the seed."""
    if not cfg.pivotal_tokens:
        return None
    vectors = initial_vectors(model.text_encoder, cfg.pivotal_tokens, cfg.seed)
    module = attach(model, Embedding(cfg.token, vectors), trainable=False)  # opened by setup_trainable
    return Pivotal(module, freeze_step(cfg), cfg.token)
