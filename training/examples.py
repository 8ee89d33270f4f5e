"""The training examples, cached once per run: VAE latents per image and text embeddings per
caption (instance photos, and class images with prior preservation), and the batches drawn from them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .errors import UserError, input_name
from .models import SDModel
from .progress import Progress, ProgressFn
from .prompts import fill_prompt
from .train_config import TrainConfig

if TYPE_CHECKING:
    from .identity_loss import FaceTargets


@dataclass
class Batchable:
    """Cached training examples: latent mean/std per image (and flip) and text embeddings."""

    latent_mean: torch.Tensor  # [N, 4, h, w]
    latent_std: torch.Tensor
    input_ids: torch.Tensor  # [N, 77] token ids (for training the text encoder)
    embeddings: torch.Tensor | None  # [N, 77, d] when the text encoder is frozen
    weights: torch.Tensor | None = None  # [N, 1, h, w] loss weights (background_weight); None: 1 everywhere
    faces: FaceTargets | None = None  # face chips and descriptors of the crops (identity_weight); None: off


def prepare_examples(cfg: TrainConfig, model: SDModel, resolution: int, accelerator, progress: ProgressFn,
                     caption: Callable[[str], str] | None = None) -> tuple[Batchable, Batchable | None]:
    """The instance examples (a photo folder is prepared on the fly) and, with prior preservation, the class ones.
    `caption` rewrites the instance captions (pivotal tuning's new tokens); their text embeddings are then
    left to the loop, which computes them while the tokens train."""
    from .data.dataset import PrepareConfig, load_dataset
    from .data.prepare import prepare_dataset

    folder = Path(cfg.instance_dir)
    prepared = dataset_folder(cfg)
    if prepared != folder:  # a photo folder: prepare it on the fly
        if accelerator.is_main_process:
            prepare_dataset(folder, prepared, PrepareConfig(token=cfg.token, class_word=cfg.class_word,
                                                            resolution=resolution, flip=cfg.flip), progress)
        accelerator.wait_for_everyone()
        folder = prepared
    dataset = load_dataset(folder)
    items = dataset.training_items()
    images = [open_rgb(item.image, "training image") for item in items]
    captions = [fill_prompt(item.caption, cfg.token, cfg.class_word) for item in items]
    if caption is not None:
        captions = [caption(c) for c in captions]
    if cfg.batch_size > len(images):
        raise UserError(f"{input_name('batch_size')} {cfg.batch_size} is larger than the {len(images)} images in "
                        f"{folder}; use a batch size of at most {len(images)} or add photos.")
    mirror = cfg.flip and not dataset.config.flip  # a dataset prepared with flip already holds mirrored copies
    instance = encode(model, images, captions, resolution, cfg, progress, "cache instance latents", mirror,
                      cache_text=not cfg.train_text_encoder and caption is None)
    if cfg.background_weight != 1.0:  # at 1.0 nothing is weighted: the loss is exactly the unweighted one
        instance.weights = subject_weights(dataset, items, instance.latent_mean.shape[-1], cfg.background_weight,
                                           mirror)
    if cfg.identity_weight:
        from .identity_loss import face_targets

        instance.faces = face_targets(images, resolution, mirror, progress)
    class_examples = None
    if cfg.prior_preservation:
        class_prompt = fill_prompt(cfg.class_prompt, cfg.token, cfg.class_word)
        paths = class_image_paths(cfg, model, resolution, accelerator, progress)
        class_images = [open_rgb(p, "class image") for p in paths]
        class_examples = encode(model, class_images, [class_prompt] * len(class_images), resolution, cfg, progress,
                                "cache class latents", cfg.flip)
    return instance, class_examples


def subject_weights(dataset, items: list, size: int, background: float, mirror: bool) -> torch.Tensor:
    """[N, 1, size, size] on the latent grid: 1 inside each item's subject region, `background` outside
    (between on its edge), 1 everywhere for an item without one; with `mirror`, then the mirrored copies."""
    maps = []
    for item in items:
        region = dataset.subject_map(item, size)
        maps.append(torch.ones(size, size) if region is None else
                    background + (1.0 - background) * torch.from_numpy(region))
    weights = torch.stack(maps)[:, None]
    return torch.cat([weights, weights.flip(-1)]) if mirror else weights


def dataset_folder(cfg: TrainConfig) -> Path:
    """The prepared dataset a run trains on: instance_dir when `prepare` made it, else <run>/dataset."""
    from .data.dataset import DATASET_JSON

    folder = Path(cfg.instance_dir)
    return folder if (folder / DATASET_JSON).is_file() else cfg.run_path / "dataset"


def open_rgb(path: Path, what: str):
    """An image from a folder the user may have edited; a bad one is one line naming it, not a traceback."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"The {what} {path} cannot be read ({str(exc).splitlines()[0][:100]}); "
                        f"remove or replace it in {Path(path).parent}.") from None


def _class_image_source(cfg: TrainConfig, resolution: int):
    """(the images given in class_dir, or the cache folder and config that generate them)."""
    from .data.class_images import ClassImageConfig, list_images

    given = list_images(Path(cfg.class_dir)) if cfg.class_dir else []
    root = Path(cfg.class_dir) if cfg.class_dir else cfg.run_path.parent / "class_images"
    icfg = ClassImageConfig(class_word=cfg.class_word, prompt=fill_prompt(cfg.class_prompt, cfg.token, cfg.class_word),
                            negative=cfg.class_negative, num=cfg.num_class_images, resolution=resolution,
                            steps=cfg.class_steps, seed=cfg.seed)
    return given, root, icfg


def class_images_to_generate(cfg: TrainConfig, model: SDModel, resolution: int) -> int:
    """How many class images the run will generate before its first step (0: off, given or cached)."""
    from .data.class_images import class_image_folder, list_images

    if not cfg.prior_preservation:
        return 0
    given, root, icfg = _class_image_source(cfg, resolution)
    if given:
        return 0
    return max(0, cfg.num_class_images - len(list_images(class_image_folder(root, model.sha256, icfg))))


def class_image_paths(cfg: TrainConfig, model: SDModel, resolution: int, accelerator,
                      progress: ProgressFn) -> list[Path]:
    """A folder that already holds images is used as it is (made by the Class Images node or
    `class-images`, or the user's own); otherwise the images are generated once into a cache."""
    from .data.class_images import ensure_class_images
    from .sampling import make_generator

    given, root, icfg = _class_image_source(cfg, resolution)
    if given:
        return given[: cfg.num_class_images]
    if accelerator.is_main_process:
        ensure_class_images(make_generator(model), model.sha256, root, icfg, progress)
    accelerator.wait_for_everyone()
    return ensure_class_images(make_generator(model), model.sha256, root, icfg).images[: cfg.num_class_images]


@torch.no_grad()
def encode(model: SDModel, images: list, captions: list[str], resolution: int, cfg: TrainConfig,
           progress: ProgressFn, stage: str, mirror: bool = False, cache_text: bool | None = None) -> Batchable:
    """VAE latents once per image (and its mirror image), text embeddings once per caption (unless
    `cache_text` is False; by default they are cached when the text encoder is frozen)."""
    from PIL import ImageOps

    if mirror:
        images = images + [ImageOps.mirror(im) for im in images]
        captions = captions + captions
    means, stds = [], []
    device, dtype = next(model.vae.parameters()).device, next(model.vae.parameters()).dtype
    for i, image in enumerate(images):
        pixels = to_tensor(image, resolution).to(device, dtype)
        dist = model.vae.encode(pixels[None]).latent_dist
        means.append(dist.mean[0].float().cpu())
        stds.append(dist.std[0].float().cpu())
        progress(Progress(stage, i + 1, len(images)))
    ids = model.tokenizer(captions, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    cache_text = not cfg.train_text_encoder if cache_text is None else cache_text
    embeddings = text_embeddings(model.text_encoder, ids) if cache_text else None
    return Batchable(torch.stack(means), torch.stack(stds), ids, embeddings)


@torch.no_grad()
def text_embeddings(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's output once per distinct row of token ids, [N, 77, d] in fp32 on the CPU."""
    device = next(text_encoder.parameters()).device
    unique: dict[tuple, torch.Tensor] = {}
    for row in ids:
        key = tuple(row.tolist())
        if key not in unique:
            unique[key] = text_encoder(row[None].to(device))[0][0].float().cpu()
    return torch.stack([unique[tuple(row.tolist())] for row in ids])


def to_tensor(image, resolution: int) -> torch.Tensor:
    """A PIL image as a [3, r, r] tensor in [-1, 1] (resized with Lanczos when it is another size)."""
    import numpy as np
    from PIL import Image

    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return array / 127.5 - 1.0


def sample_batch(cfg: TrainConfig, instance: Batchable, class_examples: Batchable | None,
                 generator: torch.Generator) -> dict:
    """Instance examples, then class examples (prior preservation), in one batch."""
    parts = [(instance, torch.randint(len(instance.input_ids), (cfg.batch_size,), generator=generator))]
    if class_examples is not None:
        parts.append((class_examples, torch.randint(len(class_examples.input_ids), (cfg.batch_size,),
                                                    generator=generator)))
    mean = torch.cat([src.latent_mean[idx] for src, idx in parts])
    std = torch.cat([src.latent_std[idx] for src, idx in parts])
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    ids = torch.cat([src.input_ids[idx] for src, idx in parts])
    emb = None if instance.embeddings is None else torch.cat([src.embeddings[idx] for src, idx in parts])
    weights = None if instance.weights is None else instance.weights[parts[0][1]]  # instance rows only
    # pivotal tuning: the instance part goes through the text encoder, the class part stays cached
    cached_class = None if emb is not None or class_examples is None or class_examples.embeddings is None \
        else class_examples.embeddings[parts[1][1]]
    return {"latents": latents, "input_ids": ids, "embeddings": emb, "weights": weights,
            "instance_index": parts[0][1], "class_embeddings": cached_class}


def batch_context(batch: dict, text_encoder, device) -> torch.Tensor:
    """The batch's text conditioning: the cached embeddings, else the text encoder's output (for the
    instance part only when the class part is cached)."""
    if batch["embeddings"] is not None:
        return batch["embeddings"].to(device)
    ids, cached = batch["input_ids"].to(device), batch.get("class_embeddings")
    if cached is None:
        return text_encoder(ids)[0]
    return torch.cat([text_encoder(ids[: len(ids) - len(cached)])[0], cached.to(device)])
