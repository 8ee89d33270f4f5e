"""Changing a LoRA's rank: the exact truncated SVD of each layer's product, computed on the factors
(QR of `up` and `down`^T, SVD of the small r x r core), never on the full m x n product."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import UserError, input_name
from ..progress import Progress, ProgressFn, no_progress
from ..resources import one_thread
from .layers import LoraFile, LoraLayer


@dataclass
class LayerResize:
    """What one layer lost: its rank before and after, and the kept fraction of its Frobenius norm."""

    name: str
    rank_before: int
    rank_after: int
    kept: float


def chosen_rank(singular_values: torch.Tensor, rank: int | None, keep_energy: float | None,
                total: float | None = None) -> tuple[int, float]:
    """Smallest rank keeping `keep_energy` of the Frobenius norm, capped at `rank`; and the kept fraction.

    `total`: the matrix's squared Frobenius norm when `singular_values` are only its largest ones.
    """
    energy = singular_values.double().pow(2)
    total = float(energy.sum()) if total is None else total
    if total == 0.0:
        return 1, 1.0  # a zero layer keeps one (zero) component, as kohya does
    kept_fraction = (energy.cumsum(0) / total).sqrt()
    k = len(singular_values)
    if keep_energy is not None:
        k = int(torch.searchsorted(kept_fraction, torch.tensor(keep_energy - 1e-12, dtype=torch.float64))) + 1
    if rank is not None:
        k = min(k, rank)
    k = max(1, min(k, len(singular_values)))
    return k, float(kept_fraction[k - 1])


def check_targets(rank: int | None, keep_energy: float | None, what: str) -> None:
    if rank is None and keep_energy is None:
        raise UserError(f"Give {what} a target: {input_name('rank')} R and/or {input_name('keep_energy')} F.")
    if rank is not None and rank < 1:
        raise UserError(f"{input_name('rank')}: {rank} must be at least 1.")
    if keep_energy is not None and not 0.0 < keep_energy <= 1.0:
        raise UserError(f"{input_name('keep_energy')}: {keep_energy} must be a fraction of the Frobenius norm in (0, 1].")


def resize(lora: LoraFile, rank: int | None = None, keep_energy: float | None = None,
           progress: ProgressFn = no_progress) -> tuple[LoraFile, list[LayerResize]]:
    """Lower each layer's rank to `rank` and/or to the rank keeping `keep_energy` of its Frobenius norm.

    Exact truncated SVD of every layer's product, computed on the factors: QR of `up` and
    `down`^T, then an SVD of the r x r core. Alpha is rescaled so alpha / rank stays the
    effective scale. Layers of one shape are done as one batch.
    """
    check_targets(rank, keep_energy, "the resize")
    if any(layer.magnitude is not None for layer in lora.layers.values()):
        raise UserError("This LoRA is a DoRA (it has dora_scale magnitudes, fit to its trained rank); a resize would "
                        "change what they scale, so use it at its trained rank (0) or train a DoRA at the rank you want.")
    trained = max((layer.rank for layer in lora.layers.values()), default=0)
    if keep_energy is None and rank is not None and rank > trained:
        raise UserError(f"{input_name('rank')}: {rank} is above the LoRA's trained rank {trained}; a resize only makes "
                        f"it smaller, so give 1 to {max(1, trained - 1)}.")
    groups: dict[tuple[int, int, int], list[str]] = {}
    for name, layer in lora.layers.items():
        groups.setdefault((layer.shape[0], math.prod(layer.shape[1:]), layer.rank), []).append(name)
    new_layers: dict[str, LoraLayer] = {}
    reports: dict[str, LayerResize] = {}
    done = 0
    with one_thread():
        for (m, n, r), names in groups.items():
            if keep_energy is None and rank is not None and r <= rank:
                for name in names:  # already small enough: nothing to compute
                    new_layers[name] = lora.layers[name]
                    reports[name] = LayerResize(name, r, r, 1.0)
            elif r > min(m, n):  # a rank above the layer's own size: its product is no bigger than the factors
                for name in names:
                    layer = lora.layers[name]
                    new_layers[name], report = factor_by_svd(name, layer.delta(), rank, keep_energy)
                    reports[name] = LayerResize(name, r, report.rank_after, report.kept)
            else:
                for chunk in _chunks(names, max(1, (32 << 20) // (4 * r * (m + n)))):  # ~32 MiB of float32 factors per batch
                    _resize_group([lora.layers[name] for name in chunk], chunk, rank, keep_energy, new_layers, reports)
            done += len(names)
            progress(Progress("resize", done, len(lora.layers), {"layers": len(names), "shape": (m, n, r)}))
    order = list(lora.layers)
    resized = LoraFile({name: new_layers[name] for name in order}, dict(lora.metadata), lora.source_format,
                       lora.family, dict(lora.unmapped), list(lora.notes), dict(lora.embeddings))
    return resized, [reports[name] for name in order]


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _resize_group(layers: list[LoraLayer], names: list[str], rank: int | None, keep_energy: float | None,
                  out: dict[str, LoraLayer], reports: dict[str, LayerResize]) -> None:
    first = layers[0]
    m, r = first.up.shape[0], first.rank
    n = first.down[0].numel()
    ups = torch.empty(len(layers), m, r)
    downs_t = torch.empty(len(layers), n, r)
    for i, layer in enumerate(layers):  # copy_ converts the file dtype in the same pass
        ups[i].copy_(layer.up.reshape(m, r))
        downs_t[i].copy_(layer.down.reshape(r, n).T)
    # Householder QR without forming Q: Q is applied later to the k kept columns only
    up_qr, up_tau = torch.geqrf(ups)
    down_qr, down_tau = torch.geqrf(downs_t)
    del ups, downs_t
    core = up_qr[:, :r, :].triu() @ down_qr[:, :r, :].triu().transpose(1, 2)  # R_up @ R_down^T, [b, r, r]
    u_core, s_core, vh_core = torch.linalg.svd(core)
    scales = torch.tensor([layer.scale for layer in layers]).unsqueeze(1)
    singular = s_core * scales.abs()  # singular values of each layer's delta W
    chosen = [chosen_rank(singular[i], rank, keep_energy) for i in range(len(layers))]
    k_max = max(k for k, _ in chosen)
    root = s_core[:, :k_max].sqrt().unsqueeze(1)  # split sqrt(S) between both factors
    up_small = torch.zeros(len(layers), m, k_max)
    up_small[:, :r] = u_core[:, :, :k_max] * root
    down_small = torch.zeros(len(layers), n, k_max)
    down_small[:, :r] = vh_core[:, :k_max, :].transpose(1, 2) * root
    new_up = torch.ormqr(up_qr, up_tau, up_small)  # Q_up @ U_k sqrt(S_k)
    new_down_t = torch.ormqr(down_qr, down_tau, down_small)  # Q_down @ V_k sqrt(S_k)
    for i, (layer, name) in enumerate(zip(layers, names)):
        k, kept = chosen[i]
        up = new_up[i, :, :k].reshape(layer.up.shape[0], k, *layer.up.shape[2:])
        down = new_down_t[i, :, :k].T.reshape(k, *layer.down.shape[1:])
        out[name] = LoraLayer(down.contiguous(), up.contiguous(), layer.scale * k)
        reports[name] = LayerResize(name, layer.rank, k, kept)


def format_report(reports: list[LayerResize], limit: int = 12) -> str:
    """A short per-layer table (the `limit` most reduced layers) and totals."""
    if not reports:
        return "no layers"
    lines = [f"{'layer':<72} {'rank':>9}  kept"]
    worst = sorted(reports, key=lambda rep: rep.kept)[:limit]
    for rep in worst:
        lines.append(f"{rep.name[-72:]:<72} {rep.rank_before:>4}->{rep.rank_after:<4} {rep.kept:6.4f}")
    if len(reports) > limit:
        lines.append(f"... and {len(reports) - limit} more layers")
    kept = [rep.kept for rep in reports]
    before = sum(rep.rank_before for rep in reports) / len(reports)
    after = sum(rep.rank_after for rep in reports) / len(reports)
    lines.append(f"{len(reports)} layers: mean rank {before:.1f} -> {after:.1f}; kept Frobenius fraction "
                 f"min {min(kept):.4f}, mean {sum(kept) / len(kept):.4f}")
    return "\n".join(lines)


def factor_by_svd(name: str, diff: torch.Tensor, rank: int | None, keep_energy: float | None) -> tuple[LoraLayer, LayerResize]:
    """The exact truncated SVD of one full weight change, as LoRA factors."""
    u, s, vh = torch.linalg.svd(diff.reshape(diff.shape[0], -1), full_matrices=False)
    k, kept = chosen_rank(s, rank, keep_energy)
    return layer_from_svd(diff.shape, u, s, vh, k), LayerResize(name, len(s), k, kept)


def layer_from_svd(shape: tuple[int, ...], u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> LoraLayer:
    """The rank-`k` LoRA `up @ down = U_k S_k V_k^T` for a weight of `shape`, sqrt(S) in each factor, scale 1."""
    root = s[:k].sqrt()
    up = (u[:, :k] * root).reshape(shape[0], k, *([1] * (len(shape) - 2)))
    down = (root.unsqueeze(1) * vh[:k]).reshape(k, *shape[1:])
    return LoraLayer(down.contiguous(), up.contiguous(), float(k))
