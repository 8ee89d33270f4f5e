"""Subject personalization of Stable Diffusion 1.5: dataset, DreamBooth/LoRA training,
LoRA toolkit and evaluation. A library and a CLI (`python -m training`); never imports ComfyUI."""

__version__ = "0.1.0"
