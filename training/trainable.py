"""What a method trains, and how: the trainable parameters (LoRA adapters or whole modules), the
optimizer and the learning-rate schedule."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import UserError
from .frozen import freeze_base_layers, keep_dora_bases_in
from .models import SDModel
from .train_config import TEXT_TARGETS, TARGETS, TrainConfig


@dataclass
class Trainable:
    """What one method trains: the modules it touches and their trainable parameters."""

    modules: dict[str, torch.nn.Module]  # "unet", "text_encoder"
    groups: dict[str, list[torch.nn.Parameter]]  # trainable params per module, and "embedding" (pivotal tuning)

    @property
    def trains_text_encoder(self) -> bool:
        """Whether gradients flow through the text encoder (its LoRA, or the new tokens' embedding)."""
        return "text_encoder" in self.groups or "embedding" in self.groups

    def named(self) -> dict[str, torch.nn.Parameter]:
        """Trainable params by qualified name ("unet.<param>", "text_encoder.<param>")."""
        wanted = {id(p) for params in self.groups.values() for p in params}
        return {f"{prefix}.{name}": p for prefix, module in self.modules.items()
                for name, p in module.named_parameters() if id(p) in wanted}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for params in self.groups.values() for p in params]

    def state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named().items()}

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        named = self.named()
        missing = sorted(set(named) - set(weights))
        if missing:
            raise UserError(f"The checkpoint does not match this training setup (it lacks {missing[0]}); "
                            "delete the run folder to start over.")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(weights[name])


def frozen_storage_dtype(cfg: TrainConfig) -> torch.dtype:
    """What a LoRA run keeps the frozen UNet layers in: the half precision it computes in, else
    the precision the base stores them in (upcasting fp16 is exact: the loss is the same)."""
    if cfg.method != "lora":
        return torch.float32  # DreamBooth trains every weight: fp32 master copies from the start
    if cfg.mixed_precision in ("fp16", "bf16"):
        return {"fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    from .models import stored_unet_dtype

    return stored_unet_dtype(cfg.base)


def freeze_base(cfg: TrainConfig, model: SDModel, storage: torch.dtype) -> None:
    """A LoRA run never changes the base UNet: keep it as it came, compute in fp32."""
    if cfg.method == "lora":
        model.unet.requires_grad_(False)
        freeze_base_layers(model.unet, storage, torch.float32)


def setup_trainable(cfg: TrainConfig, model: SDModel, embedding: torch.nn.Parameter | None = None) -> Trainable:
    """Freeze everything, then open what this method trains (and the new tokens' `embedding`, if any)."""
    for module in model.components().values():
        module.requires_grad_(False)
    lean_attention(model.unet)
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            model.text_encoder.gradient_checkpointing_enable()
    if cfg.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.unet.compile()  # in place: the module, its parameter names and state dict stay as they are
    if cfg.method == "lora":
        from peft import inject_adapter_in_model

        model.unet.add_adapter(lora_config(cfg, TARGETS[cfg.targets]))
        if cfg.dora and cfg.mixed_precision == "no":  # an fp16 base would be cast twice a forward
            keep_dora_bases_in(model.unet, torch.float32)
        lean_lora_linears(model.unet)
        if cfg.train_text_encoder:
            inject_adapter_in_model(lora_config(cfg, TEXT_TARGETS), model.text_encoder)
        generator = torch.Generator().manual_seed(cfg.seed)
        for module in (model.unet, model.text_encoder):
            for name, p in module.named_parameters():
                trained = "lora_" in name and (module is model.unet or cfg.train_text_encoder)
                p.requires_grad_(trained)
                # DoRA's magnitude keeps peft's |W0| per row: with up-weights 0 it is |W0 + delta W| before and after
                if trained and "lora_magnitude_vector" not in name:
                    # down-weights ~ N(0, 1/rank) in fp32 whatever the base's precision, up-weights 0
                    init = torch.randn(p.shape, generator=generator) / cfg.rank if "lora_A" in name else \
                        torch.zeros(p.shape)
                    p.data = init.to(p.device)
    else:
        model.unet.requires_grad_(True)
        model.text_encoder.requires_grad_(cfg.train_text_encoder)
    modules = {"unet": model.unet, "text_encoder": model.text_encoder}
    groups = {name: [p for p in m.parameters() if p.requires_grad] for name, m in modules.items()}
    groups = {name: params for name, params in groups.items() if params}
    if embedding is not None:  # its own group: its own learning rate, and it is frozen alone
        embedding.requires_grad_(True)
        groups["embedding"] = [embedding]
    for p in (p for params in groups.values() for p in params):
        p.data = p.data.float()  # fp32 master weights; mixed precision autocasts the compute
    return Trainable(modules, groups)


def lora_config(cfg: TrainConfig, targets: list[str]):
    """peft's LoraConfig for this run: rank, alpha and the variant (DoRA, rsLoRA)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets, use_dora=cfg.dora,
                      use_rslora=cfg.rslora)


def make_optimizer(cfg: TrainConfig, trainable: Trainable) -> torch.optim.Optimizer:
    groups = [{"params": trainable.groups["unet"], "lr": cfg.lr}]
    if "text_encoder" in trainable.groups:
        groups.append({"params": trainable.groups["text_encoder"], "lr": cfg.text_encoder_lr})
    if cfg.method == "lora" and cfg.loraplus_ratio > 1:
        groups = _loraplus_groups(groups, trainable, cfg.loraplus_ratio)
    if "embedding" in trainable.groups:
        groups.append({"params": trainable.groups["embedding"], "lr": cfg.pivotal_lr})
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optimizer 'adamw8bit' needs bitsandbytes and a GPU; pip install bitsandbytes, "
                            "or choose 'adamw'.") from None
        return bnb.optim.AdamW8bit(groups, weight_decay=1e-2)
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UserError("optimizer 'prodigy' needs prodigyopt; pip install prodigyopt, or choose 'adamw'.") from None
        return Prodigy(groups, weight_decay=1e-2)
    return torch.optim.AdamW(groups, weight_decay=1e-2, fused=True)  # one kernel for all params: ~10% a LoRA step


def _loraplus_groups(groups: list[dict], trainable: Trainable, ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): each group's up-weights (lora_B) at `ratio` times its lr. peft's
    create_loraplus_optimizer does this for one model and one lr (and also speeds up every 1-D parameter,
    DoRA's linear magnitudes among them); ours has a lr per component and three optimizers."""
    up = {id(p) for name, p in trainable.named().items() if "lora_B" in name}
    split = []
    for group in groups:
        params = group["params"]
        split.append(group | {"params": [p for p in params if id(p) not in up]})
        split.append(group | {"params": [p for p in params if id(p) in up], "lr": group["lr"] * ratio})
    return [group for group in split if group["params"]]


def make_lr_scheduler(cfg: TrainConfig, optimizer):
    """Stepped once per optimizer step, on every rank alike."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=cfg.steps)


def lean_lora_linears(module: torch.nn.Module) -> int:
    """Give every peft LoRA Linear of `module` with one plain adapter (no DoRA, no dropout, no LoRA bias) a
    forward without peft's per-call bookkeeping (argument checks, the adapter loop, three sub-module calls:
    tens of microseconds a layer, a few percent of a small model's step). It computes exactly what peft's
    forward computes, and hands every other case (adapters disabled or merged, another adapter active, extra
    arguments) to peft's own. The class is swapped, so isinstance checks and state dicts are unchanged.
    Returns how many layers were swapped."""
    return _swap_classes(module, _lean_lora_linear(), lambda layer: (
        not layer.lora_variant and list(layer.lora_A) == ["default"]
        and isinstance(layer.lora_dropout["default"], torch.nn.Identity)
        and layer.lora_B["default"].bias is None and not layer.fan_in_fan_out))


def _swap_classes(module: torch.nn.Module, lean: type, eligible: Callable[[torch.nn.Module], bool]) -> int:
    """Make every eligible sub-module whose class is exactly `lean`'s base an instance of `lean`; how many."""
    swapped = 0
    for layer in module.modules():
        if type(layer) is lean.__base__ and eligible(layer):
            layer.__class__ = lean
            swapped += 1
    return swapped


@functools.cache
def _lean_lora_linear() -> type:
    from peft.tuners.lora import Linear

    class LeanLoraLinear(Linear):
        """peft's LoRA Linear; one plain "default" adapter computed directly (see lean_lora_linears)."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if (args or kwargs or self._disable_adapters or self.merged_adapters or self.lora_variant
                    or self._active_adapter not in ("default", ["default"])):
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x)
            down, up = self.lora_A["default"].weight, self.lora_B["default"].weight
            if self.cast_input_dtype_enabled and x.dtype != down.dtype:
                x = x.to(down.dtype)
            update, scale = F.linear(F.linear(x, down), up), self.scaling["default"]
            if scale != 1:  # x * 1.0 is x, bit for bit, in value and gradient: one op fewer each way
                update = update * scale
            return (result + update).to(result.dtype)

    return LeanLoraLinear


def lean_attention(module: torch.nn.Module) -> int:
    """Give every diffusers Attention of `module` a forward that calls its processor directly when no extra
    keyword arguments are given (the training loop gives none). diffusers' own forward reads the processor's
    signature with `inspect` on every call to drop arguments it does not take; with none to drop it then makes
    the same call. Extra arguments (a pipeline's cross_attention_kwargs) go to diffusers' forward. The class
    is swapped, so isinstance checks and state dicts are unchanged. Returns how many modules were swapped."""
    return _swap_classes(module, _lean_attention(), lambda layer: True)


@functools.cache
def _lean_attention() -> type:
    from diffusers.models.attention_processor import Attention

    class LeanAttention(Attention):
        """diffusers' Attention; without extra arguments the processor is called directly (see lean_attention)."""

        def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None, **cross_attention_kwargs) -> torch.Tensor:
            if cross_attention_kwargs:
                return super().forward(hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
            return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                  attention_mask=attention_mask)

    return LeanAttention
