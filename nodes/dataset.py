"""Prepare Subject Dataset: a photo folder (or an IMAGE batch) -> crops, captions, a report."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .host import (CATEGORY, NodeError, HostProgress, deleted_since_written, fit_same_size, folder_signature,
                   image_hash, input_folder, output_folder, pils_to_tensor, remember_written, short_hash, slug,
                   tensor_to_pils, user_errors)

SUBJECT_DATASET = "SUBJECT_DATASET"


def subject_dataset(folder: Path, token: str, class_word: str, resolution: int) -> dict:
    """What flows along a SUBJECT_DATASET link: the prepared folder and what it was made with."""
    text = (folder / "dataset.json").read_bytes()
    return {"folder": str(folder), "token": token, "class_word": class_word, "resolution": resolution,
            "hash": hashlib.sha256(text).hexdigest()[:16]}


def dataset_crops(dataset: dict, limit: int | None = None) -> list:
    """The prepared crops (not their mirror copies) as PIL images."""
    from PIL import Image

    from ..training.data import load_dataset

    with user_errors():
        items = [item for item in load_dataset(dataset["folder"]).items if not item.flipped]
    crops = []
    for item in items[:limit]:
        try:
            with Image.open(item.image) as im:
                crops.append(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).splitlines()[0].replace(str(item.image), item.image.name)[:160]
            raise NodeError(f"The prepared crop {item.image} cannot be read ({reason}); delete the folder "
                            f"{item.image.parent} and queue again to prepare it anew.") from None
    return crops


def photo_dataset_folder(source: Path, settings: tuple) -> Path:
    """Where the dataset of a photo folder is kept: one folder per photo folder and settings."""
    return output_folder("datasets", f"{slug(source.name, 'photos')}_{short_hash(str(source), settings)}")


def _mask_pils(masks) -> list:
    """A ComfyUI MASK batch [B, H, W] (or one [H, W]) in 0..1 -> gray PIL images, white = 1."""
    from PIL import Image

    array = masks.detach().cpu().float()
    array = array[None] if array.ndim == 2 else array
    return [Image.fromarray(m, "L") for m in (array.clamp(0, 1) * 255.0).round().byte().numpy()]


def _mask_hash(masks) -> str:
    return hashlib.sha256(b"".join(m.tobytes() for m in _mask_pils(masks))).hexdigest()[:12]


class PrepareSubjectDataset:
    DESCRIPTION = ("Crops the subject's photos to squares (around the face, the centre, or padded), writes a caption "
                   "with the trigger token for each, and reports what it did. Prepared datasets are kept under "
                   "output/dreambooth/datasets/ and reused while the photos and settings stay the same.")
    CATEGORY = CATEGORY
    FUNCTION = "prepare"
    RETURN_TYPES = (SUBJECT_DATASET, "IMAGE", "STRING")
    RETURN_NAMES = ("dataset", "crops", "report")
    OUTPUT_TOOLTIPS = ("The prepared dataset, for Train Subject, Subject Fidelity and Class Images.",
                       "The crops as they will be trained on (connect a Preview Image to check them).",
                       "What was kept, skipped, upscaled or cropped without a face.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {"default": "subject", "tooltip":
                           "The folder of the subject's photos (about 15), by its name in ComfyUI's input/ folder. "
                           "Absolute paths work on a server that listens on this machine only, or with "
                           "DREAMBOOTH_ALLOW_ANY_PATH=1. Ignored when images are connected. A .txt file beside a photo is "
                           "its caption."}),
                "token": ("STRING", {"default": "sks", "tooltip":
                          "The rare word that will name the subject in prompts, e.g. 'sks'."}),
                "class_word": ("STRING", {"default": "man", "tooltip":
                               "What the subject is: 'man', 'woman', 'dog'... Captions read 'a photo of sks man'."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip":
                               "Side of the square crops in pixels; 512 for Stable Diffusion 1.5."}),
                "crop": (["face", "center", "pad"], {"default": "face", "tooltip":
                         "face: head and shoulders around the largest face (center crop when none is found); "
                         "center: the middle square; pad: the whole photo on a white square."}),
                "flip": ("BOOLEAN", {"default": False, "tooltip":
                         "Also train on mirrored copies. Leave off for asymmetric subjects (text, a parting)."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip":
                           "Photos as an image batch instead of a folder (e.g. from Load Image)."}),
                "masks": ("MASK", {"tooltip":
                          "One mask per connected image, 1 (white) on the subject: the subject region that "
                          "Train Subject's background_weight weights against. Without it, the face grown to "
                          "head and shoulders is the region (in a folder: a photo's <name>_mask.png)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, folder="", token="", class_word="", resolution=0, crop="", flip=False, **_):
        # A changed photo folder must run the node again, and so must a dataset folder deleted since
        # (a damaged crop's message says to delete it); connected images are tracked by ComfyUI.
        try:
            source = input_folder(folder)
            prepared = photo_dataset_folder(source, (token.strip(), class_word.strip(), resolution, crop, flip))
            if deleted_since_written(prepared / "dataset.json"):
                return float("nan")
            return folder_signature(source)
        except Exception:  # noqa: BLE001 - a bad folder is reported when the node runs
            return float("nan")

    def prepare(self, folder, token, class_word, resolution, crop, flip, images=None, masks=None, unique_id=None):
        from ..training.data import PrepareConfig, prepare_dataset, prepare_from_images

        cfg = PrepareConfig(token=token.strip(), class_word=class_word.strip(), resolution=resolution,
                            crop=crop, flip=flip)
        settings = (cfg.token, cfg.class_word, resolution, crop, flip)
        progress = HostProgress(unique_id)
        # overwrite: the hash-named folders under output/dreambooth/datasets/ are only ever written by this node,
        # so whatever is there (a run killed halfway included) is ours to replace, never the user's
        with user_errors():
            cfg.validate()
            if masks is not None and images is None:
                raise NodeError("masks are connected but images are not; connect the images the masks belong to "
                                "(one mask per image), or disconnect the masks.")
            if images is not None:
                key = (image_hash(images), settings) + ((_mask_hash(masks),) if masks is not None else ())
                out = output_folder("datasets", f"images_{short_hash(*key)}")
                report = prepare_from_images(tensor_to_pils(images), out, cfg, progress, overwrite=True,
                                             masks=_mask_pils(masks) if masks is not None else None)
            else:
                if not str(folder).strip():
                    raise NodeError("folder is empty; give the folder of the subject's photos "
                                    "(relative to ComfyUI's input/ folder) or connect images.")
                source = input_folder(folder)
                out = photo_dataset_folder(source, settings)
                report = prepare_dataset(source, out, cfg, progress, overwrite=True)
        remember_written(out / "dataset.json")
        dataset = subject_dataset(out, cfg.token, cfg.class_word, resolution)
        crops = fit_same_size(dataset_crops(dataset))
        return (dataset, pils_to_tensor(crops), report.text())
