"""Load Subject Checkpoint: a DreamBooth checkpoint by the name Train Subject passes along."""
from __future__ import annotations

from .host import CATEGORY, model_file, user_errors


class LoadSubjectCheckpoint:
    DESCRIPTION = ("Loads an SD1.5 checkpoint by a connected file name, as Load Checkpoint does. Use it after Train "
                   "Subject (DreamBooth): Load Checkpoint's list cannot name a file that this run writes.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The model used for denoising latents.", "The CLIP model used for encoding text prompts.",
                       "The VAE model used for encoding and decoding images to and from latent space.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": ("STRING", {"forceInput": True, "tooltip":
                              "A checkpoint name in models/checkpoints, e.g. Train Subject's model_file."}),
            },
        }

    def load(self, ckpt_name):
        import comfy.sd
        import folder_paths

        from ..training.models import inspect_checkpoint

        path = model_file("checkpoints", ckpt_name)
        with user_errors():  # a pickle, a cut-off file or another base: one line here, not ComfyUI's traceback
            inspect_checkpoint(path)
        out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True,
                                                    embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return out[:3]
