"""Subject Fidelity: is the subject there, is it the subject, did the scene survive?"""
from __future__ import annotations

import json
import re

from ..training.eval import DEFAULT_FACE_DETECTOR, FACE_DETECTORS
from .dataset import SUBJECT_DATASET, dataset_crops
from .grid import image_inputs, image_rows, more_image_inputs
from .host import (CATEGORY, DINO_FOLDER, NONE_CHOICE, HostProgress, model_choices, model_file, model_folder,
                   pils_to_tensor, save_temp_image, split_labels, user_errors)


def method_and_rank(label: str) -> tuple[str, int | None]:
    """'lora r16', 'lora_r16' or 'lora rank 16' -> ('lora', 16); 'dreambooth' -> ('dreambooth', None)."""
    match = re.match(r"^(.*?)[\s_-]+(?:r|rank\s*)(\d+)$", label.strip(), re.IGNORECASE)
    if match and match.group(1).strip():
        return match.group(1).strip(), int(match.group(2))
    return label.strip() or "images", None


def eval_images(rows: list[list], row_labels: list[str], scene_names: list[str], prompts: list[str]) -> list:
    """One `EvalImage` per tile: method/rank from its row label, scene and prompt from its column."""
    from ..training.eval.run import EvalImage

    out = []
    for r, row in enumerate(rows):
        label = row_labels[r] if r < len(row_labels) else f"row {r + 1}"
        method, rank = method_and_rank(label)
        for c, image in enumerate(row):
            scene = scene_names[c] if c < len(scene_names) else f"column {c + 1}"
            prompt = prompts[c] if c < len(prompts) else None
            out.append(EvalImage(image, prompt=prompt, method=method, rank=rank, scene=scene,
                                 label=f"{label} {scene}"))
    return out


def _one(value, default=None):
    """An INPUT_IS_LIST widget value: its single item."""
    if isinstance(value, list):
        return value[0] if value else default
    return value if value is not None else default


class SubjectFidelity:
    DESCRIPTION = ("Scores generated images against the subject's photos: face found (presence), identity "
                   "distance (dlib), and with models given CLIP-I, CLIP-T (does the image still show the scene?) and "
                   "DINO. Rows and columns as in Subject Grid. Metrics whose package or model is missing are shown "
                   "as 'not available' with the reason.")
    CATEGORY = CATEGORY
    FUNCTION = "evaluate"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True
    RETURN_TYPES = ("STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("table", "grid", "json")
    OUTPUT_TOOLTIPS = ("Mean scores per row and scene, as a text table.",
                       "The images annotated with their scores.", "Every score, as JSON.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The first row: a list of images (one per scene) or a batch."}),
                "dataset": (SUBJECT_DATASET, {"tooltip": "The subject's prepared photos: the references."}),
                "row_labels": ("STRING", {"default": "", "multiline": True, "tooltip":
                               "One label per row, comma- or newline-separated; 'lora r16' is read as method lora, "
                               "rank 16."}),
                "face_detector": (list(FACE_DETECTORS), {"default": DEFAULT_FACE_DETECTOR, "tooltip":
                                  "dlib's detector: hog is fast, cnn finds more faces (slow on a CPU), hog+cnn "
                                  "tries cnn where hog finds none."}),
            },
            "optional": {
                "prompts": ("STRING", {"forceInput": True, "tooltip":
                            "The prompts per column (Subject Scene Prompts' prompts), for CLIP-T."}),
                "scene_names": ("STRING", {"forceInput": True, "tooltip":
                                "The scene per column (Subject Scene Prompts' scene_names)."}),
                "clip_vision": (model_choices("clip_vision", none=True), {"tooltip":
                                "A CLIP vision model from models/clip_vision for CLIP-I; (none) = not scored."}),
                "dino_folder": ("STRING", {"default": "", "tooltip":
                                "A local Hugging Face folder of facebook/dino-vits16 for DINO, by its name in "
                                "ComfyUI's models/dino folder (e.g. dino-vits16); empty = not scored. Absolute "
                                "paths work on a server that listens on this machine only, or with "
                                "DREAMBOOTH_ALLOW_ANY_PATH=1."}),
                **more_image_inputs("Another row: the images of the next model."),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def evaluate(self, images, dataset, row_labels, face_detector, prompts=None, scene_names=None,
                 clip_vision=None, dino_folder=None, unique_id=None, **more):
        from ..training.eval.run import evaluate_images

        dataset, face_detector = _one(dataset), _one(face_detector)
        clip_name, dino = _one(clip_vision, NONE_CHOICE), (_one(dino_folder, "") or "").strip()
        rows = image_rows(image_inputs(images, more), len(scene_names or []) or None)
        tiles = eval_images(rows, split_labels(row_labels), list(scene_names or []), list(prompts or []))
        clip = str(model_file("clip_vision", clip_name)) if clip_name != NONE_CHOICE else None
        dino = str(model_folder(DINO_FOLDER, dino, "dino_folder")) if dino else None
        with user_errors():
            report = evaluate_images(tiles, dataset_crops(dataset), clip=clip, dino=dino,
                                     token=dataset["token"], face_detector=face_detector,
                                     progress=HostProgress(_one(unique_id)))
        grid = report.grid()
        table = report.table()
        ui = {"text": [table], "images": [save_temp_image(grid, "fidelity")]}
        return {"ui": ui, "result": (table, pils_to_tensor([grid]), json.dumps(report.to_json(), indent=1))}
