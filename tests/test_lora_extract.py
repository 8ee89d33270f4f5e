"""Extraction recovers a known change from single files and loaded models; the `lora` CLI commands
(info, resize, convert, extract) on real files."""
from __future__ import annotations

import math

import pytest
import torch

from training.lora import extract, extraction_targets, read_lora
from training.lora.extract import factor_sketched
from training.models import build_tiny, save_single_file

from lora_helpers import Q1, TE_PATH, kohya_file, one_torch_thread, randn, rel_err  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def tuned_pair(tmp_path_factory):
    """tiny as base, and a copy with known rank-3 changes in two UNet layers and one text encoder layer."""
    folder = tmp_path_factory.mktemp("extract")
    tuned = build_tiny()
    save_single_file(tuned, folder / "base.safetensors", dtype=torch.float32)
    changes = {}
    for i, name in enumerate([Q1, "unet.up_blocks.2.attentions.1.proj_in", f"text_encoder.{TE_PATH}"]):
        component, path = name.split(".", 1)
        weight = getattr(tuned, component).get_submodule(path).weight
        shape = weight.shape
        delta = (randn(shape[0], 3, seed=i) @ randn(3, math.prod(shape[1:]), seed=9 + i) * 0.05).reshape(shape)
        with torch.no_grad():
            weight += delta
        changes[name] = delta.double()
    save_single_file(tuned, folder / "tuned.safetensors", dtype=torch.float32)
    return folder, tuned, changes


def test_extract_from_single_files_recovers_the_change(tuned_pair):
    folder, _, changes = tuned_pair
    events = []
    lora, report = extract(folder / "base.safetensors", folder / "tuned.safetensors", rank=8,
                              text_encoder=True, progress=events.append)
    assert set(lora.layers) == set(changes) and lora.family == "tiny"
    for name, delta in changes.items():
        assert lora.layers[name].rank == 8
        assert rel_err(lora.layers[name].delta(torch.float64), delta) < 1e-4
    assert events[-1].step == events[-1].total == len(extraction_targets("tiny", text_encoder=True))
    assert any("did not change" in note for note in lora.notes)


def test_extract_from_loaded_models_by_kept_energy(tuned_pair):
    _, tuned, changes = tuned_pair
    lora, report = extract(build_tiny(), tuned, keep_energy=0.999)
    unet_changes = {n: d for n, d in changes.items() if n.startswith("unet.")}
    assert set(lora.layers) == set(unet_changes)
    for rep in report:
        assert rep.rank_after <= 3 and rep.kept >= 0.999
        assert rel_err(lora.layers[rep.name].delta(torch.float64), unet_changes[rep.name]) < 0.05


def test_cli_info_resize_convert_extract(tmp_path, tuned_pair, capsys):
    from training.cli import main

    path, _ = kohya_file(tmp_path)
    assert main(["lora", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:    kohya" in out and "tiny" in out and "ss_steps: 400" in out and "not mapped: none" in out

    small = tmp_path / "small.safetensors"
    assert main(["lora", "resize", str(path), "--rank", "2", "--out", str(small)]) == 0
    assert {layer.rank for layer in read_lora(small).layers.values()} == {2}
    assert "kept Frobenius fraction" in capsys.readouterr().out

    assert main(["lora", "resize", str(path), "--out", str(tmp_path / "no.safetensors")]) == 1
    assert "error:" in capsys.readouterr().err and not (tmp_path / "no.safetensors").exists()

    folder, _, changes = tuned_pair
    out_file = tmp_path / "extracted.safetensors"
    assert main(["lora", "extract", "--base", str(folder / "base.safetensors"), "--tuned", str(folder / "tuned.safetensors"),
                 "--rank", "4", "--text-encoder", "--out", str(out_file)]) == 0
    extracted = read_lora(out_file)
    assert set(extracted.layers) == set(changes)
    assert extracted.metadata["ss_new_sd_model_hash"] == extracted.metadata["dreambooth.base_sha256"]

    converted = tmp_path / "converted.safetensors"
    assert main(["lora", "convert", str(small), "--out", str(converted)]) == 0
    assert set(read_lora(converted).layers) == set(read_lora(small).layers)


# ---------------------------------------------------------------- the sketched SVD against the exact one


def dreambooth_like_change(m: int, n: int, signal_rank: int, signal_share: float, seed: int) -> torch.Tensor:
    """A fine-tune's weight change: a low-rank signal with a decaying spectrum plus full-rank noise;
    `signal_share` of the Frobenius norm is signal."""
    generator = torch.Generator().manual_seed(seed)
    decay = torch.exp(-torch.arange(signal_rank) / (signal_rank / 3))
    signal = (torch.randn(m, signal_rank, generator=generator) * decay) @ torch.randn(signal_rank, n, generator=generator)
    noise = torch.randn(m, n, generator=generator)
    return (signal / signal.norm() * signal_share + noise / noise.norm() * (1 - signal_share ** 2) ** 0.5) * 1e-2


# SD1.5 shapes: attn1.to_q of block 0, ff.net.2 of block 1, attn of the mid block, a 3x3 conv flattened
SD15_SHAPES = [(320, 320), (640, 2560), (1280, 1280), (320, 320 * 9)]


# the fast sketch's products in both dtypes it picks from (bfloat16 where the CPU has AMX), whichever this CPU has
@pytest.mark.parametrize("products", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n", SD15_SHAPES)
def test_sketched_factors_are_within_one_percent_of_the_optimal_truncation(m, n, products, one_torch_thread):
    changes = torch.stack([dreambooth_like_change(m, n, 16, 0.8, seed=m + n),  # a clear subject signal
                           dreambooth_like_change(m, n, 8, 0.4, seed=m * n),  # mostly noise
                           dreambooth_like_change(m, n, 16, 1 - 5e-9, seed=m - n)])  # the precise sketch's case
    exact = [torch.linalg.svdvals(change.double()) for change in changes]
    for rank in (4, 16, 64):
        factors = factor_sketched(["a", "b", "c"], changes, [(m, n)] * 3, rank, None, torch.Generator().manual_seed(0),
                                  products)
        for change, values, (layer, report) in zip(changes, exact, factors):
            optimal = float(values[rank:].square().sum().sqrt())
            error = float((layer.delta(torch.float64) - change.double()).norm())
            assert layer.rank == report.rank_after == rank
            assert error <= 1.01 * optimal, (m, n, rank, error / optimal)
            kept = (1 - error ** 2 / float(values.square().sum())) ** 0.5
            assert report.kept == pytest.approx(kept, abs=1e-4)  # the reported fraction is the result's own


def test_sketched_factors_are_deterministic_and_keep_energy_is_honoured(one_torch_thread):
    changes = torch.stack([dreambooth_like_change(640, 2560, 16, 0.9, seed=1)])
    first, again = (factor_sketched(["a"], changes, [(640, 2560)], 16, None, torch.Generator().manual_seed(0))[0][0]
                    for _ in range(2))
    assert torch.equal(first.up, again.up) and torch.equal(first.down, again.down)
    low_rank = dreambooth_like_change(640, 2560, 16, 1 - 5e-7, seed=2)[None]  # kept > 0.9987: the precise sketch
    for change, keep in ((changes, 0.5), (changes, 0.8), (low_rank, 0.99999)):
        exact = torch.linalg.svdvals(change[0].double())
        fraction = (exact.square().cumsum(0) / exact.square().sum()).sqrt()
        layer, report = factor_sketched(["a"], change, [(640, 2560)], None, keep, torch.Generator().manual_seed(0))[0]
        smallest = int((fraction < keep).sum()) + 1  # the exact SVD's rank for this fraction
        kept = 1 - float((layer.delta(torch.float64) - change[0].double()).square().sum() / exact.square().sum())
        assert kept ** 0.5 >= keep and smallest <= layer.rank <= smallest + 2, (keep, layer.rank, smallest)
    # noise needing most of the full rank falls back to the exact SVD, with the exact rank
    noise = torch.randn(1, 320, 320, generator=torch.Generator().manual_seed(2))
    layer, report = factor_sketched(["n"], noise, [(320, 320)], None, 0.9, torch.Generator().manual_seed(0))[0]
    noise_values = torch.linalg.svdvals(noise[0].double())
    assert layer.rank == int(((noise_values.square().cumsum(0) / noise_values.square().sum()).sqrt() < 0.9).sum()) + 1
