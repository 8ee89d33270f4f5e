"""Class Images: the prior-preservation images, generated once per checkpoint and setting."""
from __future__ import annotations

from .host import (CATEGORY, HostProgress, compute_device, empty_cache, file_signature, fit_same_size,
                   free_host_models, image_hash, model_choices, model_file, output_folder, pils_to_tensor,
                   short_hash, tensor_to_pils, user_errors)

CLASS_IMAGES = "CLASS_IMAGES"
PREVIEW_LIMIT = 16  # the IMAGE output shows at most this many; the folder holds them all


def class_images_info(folder, prompt: str, class_word: str, resolution: int, limit: int | None = None) -> dict:
    """What flows along a CLASS_IMAGES link; the trainer uses the first `count` images of the folder."""
    from ..training.data import list_images

    count = len(list_images(folder))
    return {"folder": str(folder), "count": min(count, limit) if limit else count, "prompt": prompt,
            "class_word": class_word, "resolution": resolution}


def _lazy_generator(checkpoint):
    """The class-image generator of `training.sampling`, loading the checkpoint only if images are missing."""
    state = {}

    def generate(prompts, negative, seeds, resolution, steps, guidance):
        import torch

        from ..training.models import load_model
        from ..training.sampling import make_generator

        if "generate" not in state:
            free_host_models()
            device = compute_device()
            dtype = torch.float16 if device.type == "cuda" else torch.float32
            state["generate"] = make_generator(load_model(checkpoint, dtype=dtype).to(device))
        return state["generate"](prompts, negative, seeds, resolution, steps, guidance)

    return generate


class SubjectClassImages:
    DESCRIPTION = ("Images of the subject's class ('a photo of a man') from the base checkpoint, for prior "
                   "preservation: training on them too keeps the model able to draw other men. Generated once and "
                   "cached under output/dreambooth/class_images/; or connect images made with the core sampling "
                   "nodes to use those instead.")
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = (CLASS_IMAGES, "IMAGE")
    RETURN_NAMES = ("class_images", "preview")
    OUTPUT_TOOLTIPS = ("The class images folder, for Train Subject.",
                       f"The first {PREVIEW_LIMIT} class images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "checkpoint": (model_choices("checkpoints"), {"tooltip":
                               "The base model that draws the class images: the one you train on."}),
                "class_word": ("STRING", {"default": "man", "tooltip":
                               "The subject's class, as in Prepare Subject Dataset ('man', 'woman', 'dog'...)."}),
                "class_prompt": ("STRING", {"default": "a photo of a {class}", "multiline": True, "tooltip":
                                 "The prompt of the class images; {class} becomes the class word. It is also their "
                                 "caption during training."}),
                "negative_prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                                    "What the class images should not show."}),
                "count": ("INT", {"default": 100, "min": 1, "max": 10000, "tooltip":
                          "How many class images; 100 to 200 is usual. Only the missing ones are generated."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False,
                         "tooltip": "Image i uses seed + i; another seed makes another set."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip":
                               "Side of the square images; the same as the dataset's (512 for SD1.5)."}),
                "steps": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip":
                          "Sampling steps per image (DDIM)."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Use these images as the class images instead of generating them "
                                     "(e.g. from KSampler + VAE Decode)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, checkpoint="", **_):
        try:  # a replaced checkpoint file under the same name must make new images
            return file_signature(model_file("checkpoints", checkpoint))
        except Exception:  # noqa: BLE001 - reported when the node runs
            return float("nan")

    def make(self, checkpoint, class_word, class_prompt, negative_prompt, count, seed, resolution, steps,
             images=None, unique_id=None):
        from PIL import Image

        from ..training.data import ClassImageConfig, ensure_class_images, list_images
        from ..training.models import file_sha256
        from ..training.safe_io import atomic_save_image

        cfg = ClassImageConfig(class_word=class_word.strip(), prompt=class_prompt, negative=negative_prompt,
                               num=count, resolution=resolution, steps=steps, seed=seed)
        with user_errors():
            cfg.validate()
            if images is not None:
                pils = fit_same_size(tensor_to_pils(images))
                folder = output_folder("class_images", f"from_images_{short_hash(image_hash(images))}")
                for index, image in enumerate(pils):
                    target = folder / f"class_{index:05d}.png"
                    if not target.is_file():
                        atomic_save_image(image, target, format="PNG")
                resolution = pils[0].width
            else:
                path = model_file("checkpoints", checkpoint)
                report = ensure_class_images(_lazy_generator(path), file_sha256(path), output_folder("class_images"),
                                             cfg, HostProgress(unique_id))
                folder = report.folder
                if report.generated:
                    empty_cache()  # the generator's model is gone with it
        # a cache folder may hold more than asked for (count was higher before): the first `count` are used
        info = class_images_info(folder, cfg.class_prompt, cfg.class_word, resolution,
                                 limit=None if images is not None else count)
        preview = []
        for path in list_images(folder)[:PREVIEW_LIMIT]:
            with Image.open(path) as im:
                preview.append(im.convert("RGB"))
        return (info, pils_to_tensor(fit_same_size(preview)))
