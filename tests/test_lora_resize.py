"""Rank resize equals the truncated SVD of the full product, by fixed rank and by kept energy."""
from __future__ import annotations

import pytest
import torch

from training.cli.train import flag
from training.errors import UserError, inputs_named_by
from training.lora import LoraFile, LoraLayer, module_table, resize

from lora_helpers import Q1, TE_PATH, randn, rel_err


def _reference_truncation(layer: LoraLayer, k: int) -> tuple[torch.Tensor, float]:
    full = layer.delta(torch.float64).reshape(layer.shape[0], -1)
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).reshape(layer.shape), float((s[:k].square().sum() / s.square().sum()).sqrt())


def _layers_for_resize() -> LoraFile:
    table = module_table("tiny")
    layers = {}
    for i, name in enumerate([Q1, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
                              "unet.up_blocks.3.attentions.0.transformer_blocks.0.ff.net.0.proj",
                              "unet.down_blocks.0.resnets.0.conv1", f"text_encoder.{TE_PATH}"]):
        shape = table.shapes[name]
        decay = torch.exp(-torch.arange(16.0) / (1 + i))  # distinct singular values, like a trained LoRA
        up = randn(shape[0], 16, *([1] * (len(shape) - 2)), seed=i) * decay.reshape(1, 16, *([1] * (len(shape) - 2)))
        layers[name] = LoraLayer(randn(16, *shape[1:], seed=40 + i).half(), up.half(), alpha=8.0 + i)
    return LoraFile(layers, family="tiny")


def test_resize_to_fixed_rank_equals_truncated_svd_of_the_product():
    lora = _layers_for_resize()
    small, report = resize(lora, rank=5)
    assert [r.name for r in report] == list(lora.layers)
    for rep in report:
        old, new = lora.layers[rep.name], small.layers[rep.name]
        reference, kept = _reference_truncation(old, 5)
        assert new.rank == rep.rank_after == 5 and rep.rank_before == 16
        assert rel_err(new.delta(torch.float64), reference) < 1e-5, rep.name
        assert new.alpha / new.rank == pytest.approx(old.alpha / old.rank)  # effective scale unchanged
        assert rep.kept == pytest.approx(kept, abs=1e-6)
        assert new.down.shape[1:] == old.down.shape[1:] and new.up.shape[2:] == old.up.shape[2:]


def test_resize_by_kept_energy_picks_the_smallest_rank_that_keeps_it():
    lora = _layers_for_resize()
    small, report = resize(lora, keep_energy=0.95)
    ranks = set()
    for rep in report:
        old = lora.layers[rep.name]
        reference, kept = _reference_truncation(old, rep.rank_after)
        _, kept_one_less = _reference_truncation(old, rep.rank_after - 1)
        assert kept >= 0.95 > kept_one_less
        assert rel_err(small.layers[rep.name].delta(torch.float64), reference) < 1e-5
        ranks.add(rep.rank_after)
    assert len(ranks) > 1  # layers of different spectra keep different ranks
    capped, report = resize(lora, rank=3, keep_energy=0.95)
    assert max(r.rank_after for r in report) == 3


def test_resize_needs_a_target():
    with inputs_named_by(flag), pytest.raises(UserError, match="--rank"):  # as the CLI names its inputs
        resize(_layers_for_resize())
    with inputs_named_by(flag), pytest.raises(UserError, match="keep-energy"):
        resize(_layers_for_resize(), keep_energy=1.5)
