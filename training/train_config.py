"""The one configuration of a training job, validated once at the boundary."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import UserError
from .prompts import SEED_NEGATIVE, SEED_SCENES, stray_braces
from .safe_io import file_name_problem

METHODS = ("lora", "dreambooth")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
PRECISIONS = ("no", "fp16", "bf16")
# What LoRA adapts, by module names inside the UNet's transformer blocks (diffusers naming).
TARGETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn+ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    "attn+ff+conv": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                     "conv1", "conv2", "conv_shortcut"],
}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
DEFAULTS = {"lora": {"steps": 800, "lr": 1e-4}, "dreambooth": {"steps": 400, "lr": 2e-6}}
# Fields that change the result; the rest (where files go, how often to report) do not.
NOT_IN_RESULT = {"output", "run_dir", "save_every", "validation_every", "validation_prompts", "validation_negative",
                 "resume", "overwrite", "class_dir", "gradient_checkpointing"}


@dataclass
class TrainConfig:
    method: str = "lora"
    base: str = "tiny"
    instance_dir: str = ""
    output: str = ""
    token: str = "sks"
    class_word: str = "man"
    resolution: int | None = None  # None: the base's own (512 for SD1.5, 64 for tiny)
    steps: int | None = None  # None: LoRA 800, DreamBooth 400
    batch_size: int = 1
    grad_accum: int = 1
    lr: float | None = None  # None: LoRA 1e-4, DreamBooth 2e-6 (the seed used 2e-5 with linear)
    text_encoder_lr: float | None = None  # None: same as lr
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"
    train_text_encoder: bool = False
    rank: int = 16
    alpha: float | None = None  # None: = rank
    targets: str = "attn"
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_prompt: str = "a photo of a {class}"
    class_negative: str = ""
    class_steps: int = 30  # sampling steps when the trainer generates the class images itself
    class_dir: str | None = None  # a folder of class images, used as is; empty or None: generated and cached
    flip: bool = False
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 100
    validation_prompts: list[str] = field(default_factory=lambda: list(SEED_SCENES.values()))
    validation_negative: str = SEED_NEGATIVE
    validation_every: int = 0  # 0: no validation images during training
    run_dir: str | None = None  # checkpoints, loss log, validation images; None: <output>.run/
    resume: bool = True  # a run restarted with the same config and output continues where it stopped
    overwrite: bool = False

    # ---------------------------------------------------------------- derived

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else DEFAULTS[self.method]["steps"]

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULTS[self.method]["lr"]

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def output_path(self) -> Path:
        return Path(self.output)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else self.output_path.with_name(self.output_path.name + ".run")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def result_hash(self) -> str:
        """A hash of everything that changes the trained weights (not where files go)."""
        data = {k: v for k, v in asdict(self).items() if k not in NOT_IN_RESULT}
        data["steps"], data["lr"] = self.total_steps, self.learning_rate
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})

    # ---------------------------------------------------------------- validation

    def problems(self) -> list[str]:
        """One line per bad field; empty when the config is good."""
        p = []

        def bad(name: str, why: str) -> None:
            p.append(f"{name}: {why}")

        if self.method not in METHODS:
            bad("method", f"'{self.method}' is not one of {', '.join(METHODS)}")
        if not str(self.base).strip():
            bad("base", "give 'tiny', a .safetensors checkpoint or a diffusers folder")
        if not self.instance_dir:
            bad("instance_dir", "give the folder of subject photos (or a prepared dataset folder)")
        elif not Path(self.instance_dir).is_dir():
            bad("instance_dir", f"{self.instance_dir} is not a folder; give the folder of subject photos "
                                "(or a prepared dataset folder)")
        if not self.output:
            bad("output", "give the .safetensors file to write")
        elif Path(self.output).suffix.lower() != ".safetensors":
            bad("output", f"{self.output} must end in .safetensors")
        elif name_problem := file_name_problem(Path(self.output).name):
            bad("output", f"the file name {Path(self.output).name[:60]!r} {name_problem}; choose a plain name "
                          "such as 'subject_lora.safetensors'")
        if not self.token.strip() or any(c.isspace() for c in self.token):
            bad("token", "give one word with no spaces, such as 'sks'")
        if not self.class_word.strip():
            bad("class_word", "give the class of the subject, such as 'man', 'woman' or 'dog'")
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 8):
            bad("resolution", f"{self.resolution} must be a multiple of 8 and at least 64 (512 for SD1.5)")
        if self.steps is not None and self.steps < 1:
            bad("steps", f"{self.steps} must be at least 1")
        if self.batch_size < 1:
            bad("batch_size", f"{self.batch_size} must be at least 1")
        if self.grad_accum < 1:
            bad("grad_accum", f"{self.grad_accum} must be at least 1")
        if self.lr is not None and not self.lr > 0:
            bad("lr", f"{self.lr} must be greater than 0 (LoRA: 1e-4, DreamBooth: 2e-6)")
        if self.text_encoder_lr is not None and not self.text_encoder_lr > 0:
            bad("text_encoder_lr", f"{self.text_encoder_lr} must be greater than 0")
        if self.lr_scheduler not in SCHEDULERS:
            bad("lr_scheduler", f"'{self.lr_scheduler}' is not one of {', '.join(SCHEDULERS)}")
        if self.lr_warmup_steps < 0:
            bad("lr_warmup_steps", "must be 0 or more")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"'{self.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
        if self.method == "lora":
            if self.rank < 1:
                bad("rank", f"{self.rank} must be at least 1 (4 to 128 is usual)")
            if self.alpha is not None and not self.alpha > 0:
                bad("alpha", f"{self.alpha} must be greater than 0 (usually equal to rank)")
            if self.targets not in TARGETS:
                bad("targets", f"'{self.targets}' is not one of {', '.join(TARGETS)}")
        if self.prior_preservation:
            if self.num_class_images < 1:
                bad("num_class_images", "must be at least 1 with prior preservation on")
            if self.prior_loss_weight < 0:
                bad("prior_loss_weight", "must be 0 or more")
            if self.class_steps < 1:
                bad("class_steps", "must be at least 1")
        for name, texts in (("class_prompt", [self.class_prompt]), ("validation_prompts", self.validation_prompts),
                            ("validation_negative", [self.validation_negative])):
            stray = next((b for t in texts if (b := stray_braces(t))), None)
            if stray:
                bad(name, f"{stray} is not filled in (only {{token}} and {{class}} are); remove the other braces")
        if self.noise_offset < 0:
            bad("noise_offset", "must be 0 or more (0.05 to 0.1 is usual)")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            bad("min_snr_gamma", "must be greater than 0 (5 is usual), or left empty for off")
        if self.mixed_precision not in PRECISIONS:
            bad("mixed_precision", f"'{self.mixed_precision}' is not one of {', '.join(PRECISIONS)}")
        if self.save_every < 0 or self.validation_every < 0:
            bad("save_every" if self.save_every < 0 else "validation_every", "must be 0 (off) or more")
        return p

    def validate(self) -> "TrainConfig":
        problems = self.problems()
        if problems:
            raise UserError("; ".join(problems) + ".")
        return self
