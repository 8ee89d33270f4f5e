"""The one configuration of a training job: every default decided here, validated once at the boundary.

Each field's `metadata["help"]` is the text the CLI's `--help` and the node tooltips quote.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import UserError, input_name, turn_on
from .eval import DLIB_INSTALL
from .prompts import PROBE_PROMPT, SEED_NEGATIVE, SEED_SCENES, stray_braces
from .safe_io import file_name_problem

METHODS = ("lora", "dreambooth")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
PRECISIONS = ("auto", "no", "fp16", "bf16")
KEEP = ("last", "best-identity")  # which step's weights are written (training/identity.py)
# What LoRA adapts, by module names inside the UNet's transformer blocks (diffusers naming).
TARGETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn+ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    "attn+ff+conv": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                     "conv1", "conv2", "conv_shortcut"],
}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# The one table of method defaults; help text, node tooltips and README quote it.
METHOD_DEFAULTS = {"lora": {"steps": 800, "lr": 1e-4}, "dreambooth": {"steps": 400, "lr": 2e-6}}
DEFAULT_CLASS_IMAGES = 100
# The identity loss skips timesteps above this share of the schedule (identity_loss.py says why).
IDENTITY_MAX_T_FRACTION = 0.6
VALIDATION_STEPS = 20  # sampling steps of a validation render
PIVOTAL_TOKENS = 2  # what `--pivotal` (and the node's first step up from 0) means: two new tokens
# Fields that change the result; the rest (where files go, how often to report) do not.
NOT_IN_RESULT = {"output", "run_dir", "save_every", "validation_every", "validation_prompts", "validation_negative",
                 "resume", "overwrite", "class_dir", "gradient_checkpointing", "channels_last", "compile", "embedding_dir", "validation_clip",
                 "validation_steps"}
# Fields added after outputs were first written: left out of the hash while off, so a finished
# output of an equal effective config is still reused.
HASHED_ONLY_WHEN_SET: dict[str, object] = {"background_weight": 1.0, "keep": "last", "dora": False, "rslora": False,
                                           "loraplus_ratio": 0.0, "identity_weight": 0.0}


def method_defaults_text(key: str) -> str:
    """'LoRA 800, DreamBooth 400': a method-dependent default as help text quotes it."""
    names = {"lora": "LoRA", "dreambooth": "DreamBooth"}
    return ", ".join(f"{names[m]} {d[key]:g}" for m, d in METHOD_DEFAULTS.items())


def resolve_precision(choice: str) -> str:
    """'auto': bf16 on a GPU that supports it, else fp16 on a GPU, 'no' (fp32) on the CPU."""
    if choice != "auto":
        return choice
    import torch

    if not torch.cuda.is_available():
        return "no"
    # native bf16 only (Ampere and newer): a T4 or V100 runs bf16 emulated, far slower than fp16
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def missing_face_packages() -> list[str]:
    """The packages the identity loss needs (dlib's detector, landmarks and face models) that are not installed."""
    import importlib.util

    return [name for name in ("dlib", "face_recognition_models") if importlib.util.find_spec(name) is None]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    method: str = field(default="lora", metadata=_help(
        "lora: small low-rank updates of the UNet; dreambooth: the whole UNet is trained and a checkpoint written"))
    base: str = field(default="tiny", metadata=_help(
        "the model to train on: an SD1.5 .safetensors checkpoint, a diffusers folder, or 'tiny' (random weights, "
        "for tests)"))
    instance_dir: str = field(default="", metadata=_help(
        "the folder of subject photos, or a dataset folder made by `prepare`"))
    output: str = field(default="", metadata=_help("the .safetensors file to write (a LoRA or a checkpoint)"))
    token: str = field(default="sks", metadata=_help("the trigger word that names the subject in captions"))
    class_word: str = field(default="man", metadata=_help("the subject's class: man, woman, dog, ..."))
    resolution: int | None = field(default=None, metadata=_help(
        "training size in pixels; unset: the base's own (512 for SD1.5, 64 for tiny)"))
    steps: int | None = field(default=None, metadata=_help(
        f"optimizer steps; 0 or unset: the method's default ({method_defaults_text('steps')})"))
    batch_size: int = field(default=1, metadata=_help(
        "subject images per step (plus as many class images with prior preservation)"))
    grad_accum: int = field(default=1, metadata=_help("batches accumulated into one optimizer step"))
    lr: float | None = field(default=None, metadata=_help(
        f"learning rate; 0 or unset: the method's default ({method_defaults_text('lr')})"))
    text_encoder_lr: float | None = field(default=None, metadata=_help(
        "learning rate of the text encoder when it is trained; unset: the same as lr"))
    lr_scheduler: str = field(default="constant", metadata=_help("how the learning rate changes over the steps"))
    lr_warmup_steps: int = field(default=0, metadata=_help("steps of linear warm-up from 0 to lr"))
    optimizer: str = field(default="adamw", metadata=_help(
        "adamw: the usual; adamw8bit: less memory (bitsandbytes, GPU; a DreamBooth run on a GPU with "
        "bitsandbytes installed switches to it by itself when it does not fit even with gradient checkpointing); "
        "prodigy: sets its own step size (use lr 1; prodigyopt)"))
    train_text_encoder: bool = field(default=False, metadata=_help(
        "also train the text encoder (LoRA on its attention; better identity, more memory, easier to overfit)"))
    rank: int = field(default=16, metadata=_help("LoRA rank: the capacity of the update (4 to 128 is usual)"))
    alpha: float | None = field(default=None, metadata=_help(
        "LoRA alpha; the update is scaled by alpha / rank; 0 or unset: equal to rank (scale 1)"))
    targets: str = field(default="attn", metadata=_help(
        "which UNet layers LoRA adapts: attention, + feed-forward, + convolutions"))
    dora: bool = field(default=False, metadata=_help(
        "DoRA (peft use_dora): each adapted layer also learns one magnitude per output channel, which can follow "
        "a face more closely; slower steps; the file's .dora_scale is applied by ComfyUI (diffusers' loader drops "
        "it) and the LoRA cannot be resized"))
    rslora: bool = field(default=False, metadata=_help(
        "rank-stabilized LoRA (peft use_rslora): scale by alpha / sqrt(rank) instead of alpha / rank, so runs at "
        "different ranks are comparable; the file's alpha gives that scale in any loader"))
    loraplus_ratio: float = field(default=0.0, metadata=_help(
        "LoRA+: the up-weights (lora_B) learn this many times faster than the down-weights (16 is the usual "
        "start); 0 or 1: off"))
    pivotal_tokens: int = field(default=0, metadata=_help(
        f"pivotal tuning (LoRA only): the trigger word becomes N new tokens whose embedding trains with the LoRA "
        f"for the first pivotal_frac of the steps, then stays fixed; the LoRA file carries it and a "
        f"<output>_embedding.safetensors is written beside it ({PIVOTAL_TOKENS} is usual; 0: off)"))
    pivotal_lr: float = field(default=5e-4, metadata=_help(
        "learning rate of the new token embedding (textual inversion's usual 5e-4)"))
    pivotal_frac: float = field(default=0.5, metadata=_help(
        "the fraction of the steps during which the token embedding trains (diffusers' advanced script: 0.5)"))
    embedding_dir: str | None = field(default=None, metadata=_help(
        "folder for the standalone embedding file of pivotal tuning; unset: beside the output"))
    prior_preservation: bool = field(default=False, metadata=_help(
        "also train on images of the class (generated by the base once and cached, or given in class_dir) so the "
        "class word keeps its meaning; off by default, as in diffusers' scripts"))
    prior_loss_weight: float = field(default=1.0, metadata=_help("weight of the class images' loss"))
    num_class_images: int = field(default=DEFAULT_CLASS_IMAGES, metadata=_help(
        "class images used with prior preservation (missing ones are generated)"))
    class_prompt: str = field(default="a photo of a {class}", metadata=_help(
        "prompt of the class images; {class} is the class word"))
    class_negative: str = field(default="", metadata=_help("negative prompt of generated class images"))
    class_steps: int = field(default=30, metadata=_help("sampling steps of generated class images"))
    class_dir: str | None = field(default=None, metadata=_help(
        "a folder of class images, used as they are; empty: they are generated and cached in it (unset: "
        "class_images/ beside the output)"))
    flip: bool = field(default=False, metadata=_help("also train on mirrored photos"))
    noise_offset: float = field(default=0.0, metadata=_help("noise offset (0.05 to 0.1 helps very dark or bright "
                                                            "images; 0: off)"))
    min_snr_gamma: float | None = field(default=None, metadata=_help("Min-SNR loss weighting gamma (5 is usual); "
                                                                     "unset: off"))
    background_weight: float = field(default=1.0, metadata=_help(
        "loss weight outside the subject region, 1 = off (the region: a photo's <name>_mask.png, else its face "
        "grown to head and shoulders; see prepare's contact sheet); 0 to 0.5 makes the photos' backgrounds "
        "matter less; class images are never weighted"))
    identity_weight: float = field(default=0.0, metadata=_help(
        "identity loss W (faces only, not objects or pets): adds W * (1 - t/T)^2 * (1 - cosine) between dlib's "
        "face descriptors of the model's denoised estimate and of the training crop, for subject photos with a "
        f"face at timesteps up to {IDENTITY_MAX_T_FRACTION:.0%} of the schedule; each such step decodes with the "
        "VAE (slower, more memory); needs "
        "dlib; 1 is a start (0: off)"))
    identity_every: int = field(default=1, metadata=_help(
        "compute the identity loss every K steps only, to bound its cost (4: about a quarter of it)"))
    mixed_precision: str = field(default="auto", metadata=_help(
        "compute precision (weights stay fp32); auto: bf16 on a GPU that has it, else fp16; fp32 ('no') on the CPU"))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "recompute activations in the backward pass: much less memory, about a third slower; a DreamBooth run "
        "turns it on by itself when its memory estimate exceeds the device's free memory"))
    channels_last: bool = field(default=False, metadata=_help(
        "keep the UNet's weights and activations in channels-last order (GPU convolutions in fp16/bf16 may run "
        "faster; measure with bench/bench_gpu.py)"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the UNet (GPU; the first steps take a minute or more to compile)"))
    seed: int = field(default=0, metadata=_help("seed of the LoRA initialisation, the noise and the timesteps"))
    save_every: int = field(default=100, metadata=_help("write a resumable checkpoint every N steps (0: never)"))
    validation_prompts: list[str] = field(default_factory=lambda: [*SEED_SCENES.values(), PROBE_PROMPT], metadata=_help(
        "prompts rendered every validation_every steps; {token} and {class} are filled in (default: the three "
        "scenes and an off-identity probe, '" + PROBE_PROMPT + "')"))
    validation_negative: str = field(default=SEED_NEGATIVE, metadata=_help("negative prompt of the validation images"))
    validation_steps: int = field(default=VALIDATION_STEPS, metadata=_help(
        "sampling steps of each validation render (fewer: faster, rougher pictures)"))
    validation_every: int = field(default=0, metadata=_help(
        "render the validation prompts every N steps and score them: subject present (a face found), identity "
        "distance to the dataset's crops, and CLIP-T when CLIP weights are given (0: never)"))
    validation_clip: str | None = field(default=None, metadata=_help(
        "a local Hugging Face CLIP folder (with its text tower) for the validation renders' CLIP-T; unset: no CLIP-T"))
    keep: str = field(default="last", metadata=_help(
        "which weights are written: last (the final step) or best-identity (the validated step with the lowest "
        "identity distance among renders with a face; ties: the later step)"))
    run_dir: str | None = field(default=None, metadata=_help(
        "checkpoints, loss log and validation images; unset: <output>.run/ beside the output"))
    resume: bool = field(default=True, metadata=_help(
        "continue from the last checkpoint of the same run and config"))
    overwrite: bool = field(default=False, metadata=_help("replace an existing output made by another config"))

    def __post_init__(self) -> None:
        """Method defaults are decided here, once: steps, lr, alpha and text_encoder_lr are numbers from now on."""
        defaults = METHOD_DEFAULTS.get(self.method, METHOD_DEFAULTS["lora"])
        if not self.steps:
            self.steps = defaults["steps"]
        if not self.lr:
            self.lr = defaults["lr"]
        self.alpha = float(self.alpha or self.rank)
        if not self.text_encoder_lr:
            self.text_encoder_lr = self.lr

    # ---------------------------------------------------------------- derived

    @property
    def output_path(self) -> Path:
        return Path(self.output)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else self.output_path.with_name(self.output_path.name + ".run")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def result_hash(self) -> str:
        """A hash of everything that changes the trained weights (not where files go); equal for equal
        effective configs, and as it was before defaults were resolved in the config."""
        data = {k: v for k, v in asdict(self).items() if k not in NOT_IN_RESULT}
        data["mixed_precision"] = resolve_precision(self.mixed_precision)
        # the values these had when unset were hashed as None
        data["alpha"] = None if self.alpha == self.rank else self.alpha
        data["text_encoder_lr"] = None if self.text_encoder_lr == self.lr else self.text_encoder_lr
        for name, off in HASHED_ONLY_WHEN_SET.items():
            if data.get(name) == off:
                del data[name]
        if self.keep != "last":  # the kept step depends on which steps are validated and what they render
            data |= {k: getattr(self, k) for k in ("validation_every", "validation_prompts", "validation_negative")}
            if self.validation_steps != VALIDATION_STEPS:  # added later: hashed only when changed
                data["validation_steps"] = self.validation_steps
        if not self.identity_weight:  # off: how often it would be computed changes nothing
            data.pop("identity_every", None)
        if not self.pivotal_tokens:  # off: its settings change nothing
            for name in ("pivotal_tokens", "pivotal_lr", "pivotal_frac"):
                data.pop(name, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- validation

    def problems(self) -> list[str]:
        """One line per bad field ("field: why", the field as the user's surface names it: errors.input_name);
        empty when the config is good."""
        p = []

        def bad(name: str, why: str) -> None:
            p.append(f"{input_name(name)}: {why}")

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
        if (self.steps or 0) < 1:
            bad("steps", f"{self.steps} must be at least 1")
        if self.batch_size < 1:
            bad("batch_size", f"{self.batch_size} must be at least 1")
        if self.grad_accum < 1:
            bad("grad_accum", f"{self.grad_accum} must be at least 1")
        if not (self.lr or 0) > 0:
            bad("lr", f"{self.lr} must be greater than 0 ({method_defaults_text('lr')})")
        if not (self.text_encoder_lr or 0) > 0:
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
            if not (self.alpha or 0) > 0:
                bad("alpha", f"{self.alpha} must be greater than 0 (usually equal to rank)")
            if self.targets not in TARGETS:
                bad("targets", f"'{self.targets}' is not one of {', '.join(TARGETS)}")
            if self.loraplus_ratio < 0:
                bad("loraplus_ratio", f"{self.loraplus_ratio} must be 0 or 1 (off) or more (16 is the usual start)")
        elif self.dora or self.rslora or self.loraplus_ratio > 1:
            variant = "dora" if self.dora else "rslora" if self.rslora else "loraplus_ratio"
            bad(variant, "DoRA, rsLoRA and LoRA+ change how a LoRA trains; set method to lora, or turn them off")
        if self.pivotal_tokens:
            if self.method != "lora":
                bad("pivotal_tokens", "pivotal tuning trains a LoRA; set method to lora, or pivotal_tokens to 0")
            elif not 0 < self.pivotal_tokens <= 16:
                bad("pivotal_tokens", f"{self.pivotal_tokens} must be 0 (off) or 1 to 16 (2 is usual)")
            if not self.pivotal_lr > 0:
                bad("pivotal_lr", f"{self.pivotal_lr} must be greater than 0 (5e-4 is usual)")
            if not 0 < self.pivotal_frac <= 1:
                bad("pivotal_frac", f"{self.pivotal_frac} must be above 0 and at most 1 (0.5 is usual)")
        if self.prior_preservation:
            if self.num_class_images < 1:
                bad("num_class_images", "must be at least 1 with prior preservation on")
            if self.prior_loss_weight < 0:
                bad("prior_loss_weight", "must be 0 or more")
            if self.class_steps < 1:
                bad("class_steps", "must be at least 1")
        elif self.class_dir:
            bad("class_dir", f"class images are used only with {input_name('prior_preservation')} on; "
                             f"{turn_on('prior_preservation')} or leave {input_name('class_dir')} empty")
        for name, texts in (("class_prompt", [self.class_prompt]), ("validation_prompts", self.validation_prompts),
                            ("validation_negative", [self.validation_negative])):
            stray = next((b for t in texts if (b := stray_braces(t))), None)
            if stray:
                bad(name, f"{stray} is not filled in (only {{token}} and {{class}} are); remove the other braces")
        if self.noise_offset < 0:
            bad("noise_offset", "must be 0 or more (0.05 to 0.1 is usual)")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            bad("min_snr_gamma", "must be greater than 0 (5 is usual), or left empty for off")
        if not 0 <= self.background_weight <= 1:
            bad("background_weight", f"{self.background_weight} must be from 0 to 1 (1: off)")
        if not self.identity_weight >= 0:
            bad("identity_weight", f"{self.identity_weight} must be 0 (off) or more (1 is a start)")
        elif self.identity_weight and (missing := missing_face_packages()):
            bad("identity_weight", f"needs {' and '.join(missing)}, not installed here; {DLIB_INSTALL}, or set it "
                                   "to 0")
        if self.identity_every < 1:
            bad("identity_every", f"{self.identity_every} must be at least 1")
        if self.mixed_precision not in PRECISIONS:
            bad("mixed_precision", f"'{self.mixed_precision}' is not one of {', '.join(PRECISIONS)}")
        elif self.mixed_precision == "fp16" and resolve_precision("auto") == "no":
            bad("mixed_precision", "fp16 needs a GPU; choose auto, no or bf16 to train on the CPU")
        if self.validation_steps < 1:
            bad("validation_steps", f"{self.validation_steps} must be at least 1 ({VALIDATION_STEPS} is usual)")
        if self.save_every < 0 or self.validation_every < 0:
            bad("save_every" if self.save_every < 0 else "validation_every", "must be 0 (off) or more")
        if self.validation_clip and not Path(self.validation_clip).is_dir():
            bad("validation_clip", f"{self.validation_clip} is not a folder; give a local Hugging Face CLIP folder "
                                   "(config.json, model.safetensors, tokenizer files), or leave it empty")
        if self.keep not in KEEP:
            bad("keep", f"'{self.keep}' is not one of {', '.join(KEEP)}")
        elif self.keep == "best-identity" and not self.validation_every > 0:
            bad("keep", f"best-identity chooses among validated steps; set {input_name('validation_every')} "
                        "above 0, or keep last")
        return p

    def validate(self) -> "TrainConfig":
        """Refuse a bad config in one line; then decide precision 'auto' for this machine."""
        problems = self.problems()
        if problems:
            raise UserError("; ".join(problems) + ".")
        self.mixed_precision = resolve_precision(self.mixed_precision)
        return self


def field_help(name: str) -> str:
    """A field's help text (what the CLI's --help and the node tooltips show)."""
    return next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)
