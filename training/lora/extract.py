"""Extraction: a LoRA approximating `tuned - base`, read a few layers at a time from two models and
factored by a seeded randomized SVD (only the kept singular vectors are ever computed)."""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from .. import ldm_keys
from ..errors import UserError
from ..progress import Progress, ProgressFn, no_progress
from .layers import LoraFile, LoraLayer
from .names import FAMILIES, module_table
from .resize import LayerResize, check_targets, chosen_rank, factor_by_svd, layer_from_svd


class _WeightSource:
    """Reads one weight at a time from a model, so extraction holds one layer per model in memory."""

    def __init__(self, label: str, family: str, get: Callable[[str], torch.Tensor | None]):
        self.label, self.family, self._get = label, family, get

    def get(self, name: str) -> torch.Tensor | None:
        return self._get(name)


def _weight_source(model: Any) -> _WeightSource:
    """A `_WeightSource` over `tiny`, a single-file checkpoint, a diffusers folder, an `SDModel`,
    or `{"unet": state_dict, "text_encoder": state_dict}` in diffusers naming."""
    from ..models import SDModel, inspect_checkpoint, load_model

    if isinstance(model, (str, os.PathLike)) and str(model) == "tiny":
        model = load_model("tiny")
    if isinstance(model, SDModel):
        states = {"unet": model.unet.state_dict(), "text_encoder": model.text_encoder.state_dict()}
        return _state_source(model.source, states, model.family)
    if isinstance(model, Mapping):
        return _state_source("the given state dicts", model, None)
    path = Path(model)
    if path.is_dir():
        return _folder_source(path)
    info = inspect_checkpoint(path)  # refuses LoRAs, SDXL, SD2, inpainting, pickles, truncated files
    return _safetensors_source(path.name, info.family, [path], lambda name: [_single_file_key(name, info.family)])


def _single_file_key(name: str, family: str) -> str:
    component, path = name.split(".", 1)
    if component == "unet":
        return f"{ldm_keys.UNET_PREFIX}{module_table(family).ldm[name]}.weight"
    return f"{ldm_keys.TEXT_PREFIX}{path}.weight"


def _diffusers_keys(name: str) -> list[str]:
    component, path = name.split(".", 1)
    return [f"{path}.weight"] if component == "unet" else [f"{path}.weight", f"text_model.{path}.weight"]


def _state_source(label: str, states: Mapping[str, Mapping[str, torch.Tensor]], family: str | None) -> _WeightSource:
    def get(name: str) -> torch.Tensor | None:
        component = name.split(".", 1)[0]
        state = states.get(component) or {}
        return next((state[k] for k in _diffusers_keys(name) if k in state), None)

    return _WeightSource(label, family or _family_by_shape(label, get), get)


def _folder_source(path: Path) -> _WeightSource:
    files = sorted((path / "unet").glob("*.safetensors")) + sorted((path / "text_encoder").glob("*.safetensors"))
    if not (path / "unet").is_dir() or not files:
        raise UserError(f"{path} is not a diffusers model folder with .safetensors weights; give a .safetensors "
                        "checkpoint, a diffusers folder or 'tiny'.")
    source = _safetensors_source(path.name, None, files, _diffusers_keys)
    return source


def _safetensors_source(label: str, family: str | None, files: list[Path],
                        keys_of: Callable[[str], list[str]]) -> _WeightSource:
    from safetensors import safe_open

    where: dict[tuple[str, str], Any] = {}  # (component or "", key) -> the open file
    for file in files:  # opened once: a full checkpoint's header is ~1100 keys of JSON, parsed on every open
        component = file.parent.name if file.parent.name in ("unet", "text_encoder") and len(files) > 1 else ""
        handle = safe_open(str(file), framework="pt")
        where |= {(component, key): handle for key in handle.keys()}

    def get(name: str) -> torch.Tensor | None:
        component = name.split(".", 1)[0]
        for key in keys_of(name):
            handle = where.get((component, key)) or where.get(("", key))
            if handle is not None:
                return handle.get_tensor(key)
        return None

    return _WeightSource(label, family or _family_by_shape(label, get), get)


def _family_by_shape(label: str, get: Callable[[str], torch.Tensor | None]) -> str:
    """The layout whose first and last cross-attention key projections match the model's."""
    for family in FAMILIES:
        table = module_table(family)
        probes = [n for n in table.shapes if n.endswith("attn2.to_k")]
        weights = [get(name) for name in (probes[0], probes[-1])]
        if all(w is not None and tuple(w.shape) == table.shapes[n] for w, n in zip(weights, (probes[0], probes[-1]))):
            return family
    raise UserError(f"{label} is not a Stable Diffusion 1.5 model (its cross-attention weights fit no SD1.5 layout); "
                    "extract from an SD1.5 checkpoint and its fine-tuned copy.")


def extraction_targets(family: str, text_encoder: bool = False) -> list[str]:
    """What `extract` looks at: every Linear/1x1-conv of the UNet's transformer blocks (kohya's
    default), plus the text encoder's attention and MLP layers when asked."""
    names = [name for name in module_table(family).shapes if name.startswith("unet.") and ".attentions." in name]
    if text_encoder:
        names += [name for name in module_table(family).shapes if name.startswith("text_encoder.encoder.layers.")]
    return names


def extract(base: Any, tuned: Any, rank: int | None = None, keep_energy: float | None = None,
            text_encoder: bool = False, min_diff: float = 0.0, progress: ProgressFn = no_progress,
            exact: bool = False, products: torch.dtype | None = None) -> tuple[LoraFile, list[LayerResize]]:
    """A LoRA approximating `tuned - base`, a few same-shape layers at a time.

    `base` / `tuned`: `tiny`, a single-file checkpoint, a diffusers folder, an `SDModel`, or
    `{"unet": ..., "text_encoder": ...}` diffusers state dicts. Layers whose largest change is
    at most `min_diff` are left out. Each change is factored by `sketched_svd` (seeded, so
    the same inputs give the same file on one machine; it multiplies in bfloat16 where the CPU
    has AMX, or in `products`); `exact=True` takes the full SVD of every change instead.
    """
    check_targets(rank, keep_energy, "the extraction")
    base_src, tuned_src = _weight_source(base), _weight_source(tuned)
    if base_src.family != tuned_src.family:
        raise UserError(f"{base_src.label} ({base_src.family}) and {tuned_src.label} ({tuned_src.family}) are "
                        "different model layouts; extract from a model and its own fine-tuned copy.")
    family = base_src.family
    targets = extraction_targets(family, text_encoder)
    shapes = module_table(family).shapes
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name in targets:
        by_shape.setdefault((shapes[name][0], math.prod(shapes[name][1:])), []).append(name)
    generator = torch.Generator().manual_seed(SKETCH_SEED)
    done: dict[str, tuple[LoraLayer, LayerResize]] = {}
    unchanged = step = 0
    # one buffer for every chunk's changes: fresh 32 MB blocks would each be page-faulted in again
    per_chunk = {shape: max(1, BATCH_BYTES // (4 * shape[0] * shape[1])) for shape in by_shape}
    room = torch.empty(max(min(count, len(by_shape[shape])) * math.prod(shape) for shape, count in per_chunk.items()))
    scratch_room = torch.empty(max(m * n for m, n in by_shape))
    for (m, n), names in by_shape.items():
        for chunk in _chunks(names, per_chunk[m, n]):
            changed, diffs = [], room[:len(chunk) * m * n].view(len(chunk), m, n)
            scratch = scratch_room[:m * n].view(m, n)
            for name in chunk:
                old, new = base_src.get(name), tuned_src.get(name)
                if old is None or new is None:
                    missing = base_src.label if old is None else tuned_src.label
                    raise UserError(f"{missing} has no weight for {name}; it is not a complete SD1.5 model.")
                diff = diffs[len(changed)]
                # new.float() - old.float() without new buffers; fp32 - fp16 in place is ~5x slower than casting first
                diff.copy_(new.reshape(m, n)).sub_(scratch.copy_(old.reshape(m, n)))
                del old, new
                low, high = torch.aminmax(diff)
                if max(-float(low), float(high)) <= min_diff:  # the largest |change|, without an |diff| copy
                    unchanged += 1
                else:
                    changed.append(name)
            diffs = diffs[:len(changed)]
            if exact:
                done |= {name: factor_by_svd(name, diff.reshape(shapes[name]), rank, keep_energy)
                         for name, diff in zip(changed, diffs)}
            elif changed:
                done |= dict(zip(changed, factor_sketched(changed, diffs, [shapes[n] for n in changed],
                                                           rank, keep_energy, generator, products)))
            del diffs
            for name in chunk:
                step += 1
                progress(Progress("extract", step, len(targets), {"layer": name}))
    notes = [f"{unchanged} of {len(targets)} layers did not change and were left out"] if unchanged else []
    meta = {"dreambooth.extracted_from": tuned_src.label, "dreambooth.extracted_base": base_src.label}
    if not done:
        raise UserError(f"{tuned_src.label} does not differ from {base_src.label} in any extracted layer; "
                        "nothing to extract (was the right fine-tuned model given?).")
    order = [name for name in targets if name in done]
    layers = {name: done[name][0] for name in order}
    return LoraFile(layers, meta, "extracted", family, {}, notes), [done[name][1] for name in order]


# ---------------------------------------------------------------- the sketched SVD

SKETCH_SEED = 0
POWER_ITERATIONS = 4  # with the oversampling below: within 1% of the optimal rank-r error on SD1.5 shapes (tests)
MIN_OVERSAMPLE, MAX_OVERSAMPLE = 8, 32  # extra sketch columns: the rank itself, within these bounds
KEEP_ENERGY_START = 32  # first sketch rank when only --keep-energy is given; grows 4x while short of it
BATCH_BYTES = 32 << 20  # float32 changes of one shape factored together
# A fast sketch resolves singular directions down to about 1% of the change's norm (bfloat16 products, a Cholesky
# step that damps what lies below that): a change it leaves less than this fraction of (nearly exactly low-rank,
# such as a merged LoRA in fp32) is sketched again the precise way, which has no such floor.
FAST_MIN_RESIDUAL = 0.05


@functools.cache
def fast_product_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it in hardware (Intel AMX: about 5x the fp32 matmul speed), else float32."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so asked for with a fallback
    return torch.bfloat16 if has_amx is not None and has_amx() else torch.float32


def sketched_svd(matrices: torch.Tensor, width: int, generator: torch.Generator, fast: bool = True,
                 products: torch.dtype = torch.float32,
                 power_iterations: int = POWER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `width` singular triplets of each matrix in `[b, m, n]` (Halko, Martinsson & Tropp 2011, 4.4 and
    5.1): U [b, m, w], S [b, w], Vh [b, w, n]. `products`: the fast sketch's dtype for the power iterations."""
    # fast: products in `products`, each half step orthonormalized by a Cholesky factor; precise: fp32 and Householder
    # QRs. Either way the last half step is fp32 and Householder, and the result is the change projected onto the row
    # space found, its SVD taken from `matrices @ co_basis` (m x w): no further pass over the change.
    b, m, n = matrices.shape
    orthonormal, low = (_cholesky_orthonormal, matrices.to(products)) if fast else (_householder, matrices)
    basis = orthonormal((low @ torch.randn(b, n, width, generator=generator).to(low.dtype)).float())
    # A^T Q as (Q^T A)^T: a transposed bf16 copy of a tall change would cost more than all the products
    for _ in range(power_iterations - 1):
        co_basis = orthonormal((basis.to(low.dtype).mT @ low).mT.float())
        basis = orthonormal((low @ co_basis.to(low.dtype)).float())
    del low
    co_basis = _householder((basis.mT @ matrices).mT)
    u, s, wh = torch.linalg.svd(matrices @ co_basis, full_matrices=False)
    return u, s, wh @ co_basis.mT


def _householder(columns: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(columns).Q


def _cholesky_orthonormal(columns: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of each `[m, w]` block's columns, 2-3x cheaper than a Householder QR."""
    # The Gram matrix is shifted by 1e-6 of its trace, so directions below ~1e-3 of the norm are damped, not
    # resolved (see FAST_MIN_RESIDUAL); where the factor still fails, the Householder QR.
    gram = columns.mT @ columns
    diagonal = gram.diagonal(dim1=1, dim2=2)
    diagonal.add_(diagonal.sum(dim=1, keepdim=True) * 1e-6 + 1e-30)
    factor, failed = torch.linalg.cholesky_ex(gram)
    if bool(failed.any()):
        return _householder(columns)
    return torch.linalg.solve_triangular(factor.mT, columns, upper=True, left=False)


def factor_sketched(names: list[str], diffs: torch.Tensor, shapes: list[tuple[int, ...]], rank: int | None,
                    keep_energy: float | None, generator: torch.Generator,
                    products: torch.dtype | None = None) -> list[tuple[LoraLayer, LayerResize]]:
    """Rank `rank` (and/or `keep_energy`) factors of each change, its kept fraction against the exact norm;
    `products`: the fast sketch's dtype (default `fast_product_dtype()`)."""
    # With --keep-energy alone the sketch grows until it holds that fraction; a change that needs more than a
    # quarter of its full rank gets the exact SVD, and one the fast sketch leaves under FAST_MIN_RESIDUAL of is
    # sketched again the precise way.
    _, m, n = diffs.shape
    full = min(m, n)
    products = fast_product_dtype() if products is None else products
    # |change|^2 per layer: rows' norms in fp32, summed in fp64 (no fp64 copy of the changes)
    totals = torch.linalg.vector_norm(diffs, dim=2).double().square().sum(dim=1).tolist()
    out: dict[int, tuple[LoraLayer, LayerResize]] = {}

    def sketch(group: list[int], width: int, target: int, fast: bool) -> tuple[list[int], list[int]]:
        """Factors the changes in `group` into `out`; returns those short of --keep-energy, and those
        the fast sketch resolves too coarsely."""
        u, s, vh = sketched_svd(diffs if len(group) == len(names) else diffs[group], width, generator, fast, products)
        short, precise = [], []
        for j, i in enumerate(group):
            k, kept = chosen_rank(s[j, :target], rank, keep_energy, totals[i])
            if rank is None and kept < keep_energy - 1e-12:
                short.append(i)
            elif fast and 1 - kept ** 2 < FAST_MIN_RESIDUAL ** 2:
                precise.append(i)
            else:
                out[i] = layer_from_svd(shapes[i], u[j], s[j], vh[j], k), LayerResize(names[i], full, k, kept)
        return short, precise

    todo = list(range(len(names)))
    target = rank if rank is not None else KEEP_ENERGY_START
    while todo:
        width = target + min(max(target, MIN_OVERSAMPLE), MAX_OVERSAMPLE)
        if 4 * max(target, MIN_OVERSAMPLE) > full:  # over a quarter of the full rank: the exact SVD costs no more
            for i in todo:
                out[i] = factor_by_svd(names[i], diffs[i].reshape(shapes[i]), rank, keep_energy)
            break
        short, precise = sketch(todo, width, target, fast=True)
        todo, target = short + (sketch(precise, width, target, fast=False)[0] if precise else []), target * 4
    return [out[i] for i in range(len(names))]


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
