"""Frozen base layers (training/frozen.py): the same numbers as plain layers, less kept for backward."""
import copy
import logging

import pytest
import torch
from peft import LoraConfig

from training.frozen import FrozenConv2d, FrozenLinear, freeze_base_layers, keep_dora_bases_in
from training.models import build_tiny
from training.train_config import TARGETS

LAYERS = {
    "linear": (lambda: torch.nn.Linear(24, 40), (2, 7, 24)),
    "conv3x3": (lambda: torch.nn.Conv2d(256, 16, 3, padding=1), (2, 256, 9, 9)),
    "conv-stride2": (lambda: torch.nn.Conv2d(256, 16, 3, stride=2, padding=1), (2, 256, 9, 9)),
    "conv1x1-no-bias": (lambda: torch.nn.Conv2d(256, 16, 1, bias=False), (2, 256, 5, 5)),
}


def saved_bytes(fn, x) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for backward while running fn(x), counting each storage once."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    return sum(seen.values()), y


@pytest.mark.parametrize("kind", LAYERS)
def test_a_frozen_layer_gives_the_plain_layers_output_and_input_gradient_bit_for_bit(kind):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    plain = make().requires_grad_(False)
    frozen = copy.deepcopy(plain)
    # in one precision a Linear stays plain: it keeps only its weight for backward already
    assert freeze_base_layers(frozen, torch.float32, torch.float32) == (0 if kind == "linear" else 1)
    x = torch.randn(shape, requires_grad=True)
    y_plain, y_frozen = plain(x), frozen(x)
    grad = torch.randn_like(y_plain)
    assert torch.equal(y_plain, y_frozen)
    assert torch.equal(torch.autograd.grad(y_plain, x, grad)[0], torch.autograd.grad(y_frozen, x, grad)[0])


@pytest.mark.parametrize("kind", LAYERS)
def test_fp16_storage_computes_in_fp32_exactly_as_an_fp32_copy_of_the_fp16_weights(kind):
    make, shape = LAYERS[kind]
    torch.manual_seed(1)
    reference = make().requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.half().float())  # the values an fp16 file holds
    frozen = copy.deepcopy(reference)
    freeze_base_layers(frozen, torch.float16, torch.float32)
    assert frozen.weight.dtype == torch.float16
    x = torch.randn(shape, requires_grad=True)
    y = frozen(x)
    assert y.dtype == torch.float32 and torch.equal(y, reference(x))
    grad = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(reference(x), x, grad)[0])


def test_a_frozen_conv_keeps_only_its_weight_for_backward():
    conv = torch.nn.Conv2d(256, 32, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 256, 32, 32, requires_grad=True)
    plain, _ = saved_bytes(conv, x)
    freeze_base_layers(conv, torch.float32, torch.float32)
    frozen, _ = saved_bytes(conv, x)
    weight = conv.weight.numel() * 4
    assert plain >= x.numel() * 4 + weight  # PyTorch keeps the input although the weight takes no gradient
    assert frozen == weight


def test_a_trainable_weight_in_a_frozen_twin_still_gets_its_gradient():
    """peft builds a LoRA's conv factors with the class of the layer it wraps."""
    layer = FrozenConv2d(4, 2, 1, bias=False)
    x = torch.randn(1, 4, 3, 3)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    linear = FrozenLinear(4, 2)
    linear(torch.randn(3, 4)).sum().backward()
    assert linear.weight.grad is not None


def test_under_autocast_a_frozen_layer_computes_in_the_autocast_precision():
    torch.manual_seed(2)
    plain = torch.nn.Linear(16, 16).requires_grad_(False)
    frozen = copy.deepcopy(plain)
    freeze_base_layers(frozen, torch.bfloat16, torch.float32)
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain, y_frozen = plain(x), frozen(x)
    assert y_frozen.dtype == torch.bfloat16
    assert torch.allclose(y_plain.float(), y_frozen.float(), atol=2e-2)
    y_frozen.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_the_tiny_unet_with_a_lora_swaps_every_frozen_layer_and_keeps_norms_in_fp32():
    unet = build_tiny().unet.requires_grad_(False)
    plain_layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in unet.modules())
    assert freeze_base_layers(unet, torch.float16, torch.float32) == plain_layers - 1  # all but conv_in
    assert unet.dtype == torch.float32  # what diffusers' pipelines cast their inputs to
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS["attn+ff+conv"]))
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm) and module.weight is not None:
            assert module.weight.dtype == torch.float32, name
        if type(module) in (FrozenLinear, FrozenConv2d) and "lora_" not in name:
            assert module.weight.dtype == torch.float16 and not module.weight.requires_grad, name
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 77, 32)).sample
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_in_one_precision_only_wide_convolutions_are_swapped():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv2d(4, 256, 1), torch.nn.Conv2d(256, 256, 3),
                                torch.nn.Conv2d(64, 64, 3), torch.nn.Linear(256, 256)).requires_grad_(False)
    assert freeze_base_layers(model, torch.float32, torch.float32) == 1
    assert [type(m).__name__ for m in model] == ["Linear", "Conv2d", "FrozenConv2d", "Conv2d", "Linear"]
    assert freeze_base_layers(model, torch.float16, torch.float32) == 3  # casting: all but the first layer
    assert [type(m).__name__ for m in model] == ["Linear", "FrozenConv2d", "FrozenConv2d", "FrozenConv2d",
                                                 "FrozenLinear"]


def test_a_base_kept_in_fp16_hashes_as_the_same_base():
    """Class-image caches and the output's base_sha256 must not depend on the storage precision."""
    from training.models import weights_sha256

    model = build_tiny()
    with torch.no_grad():
        for p in model.unet.parameters():
            p.copy_(p.half().float())  # the values an fp16 file holds
    before = weights_sha256(model)
    model.unet.requires_grad_(False)
    freeze_base_layers(model.unet, torch.float16, torch.float32)
    torch.nn.Module.to(model.unet.down_blocks, dtype=torch.float16)
    assert any(p.dtype == torch.float16 for p in model.unet.parameters())
    assert weights_sha256(model) == before


def output_and_gradients(unet, args: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward and backward of `unet` on `args` (fresh gradients): its output and every parameter's gradient."""
    unet.zero_grad(set_to_none=True)
    out = unet(*args).sample
    out.square().mean().backward()
    return out.detach(), [p.grad for p in unet.parameters() if p.grad is not None]


def test_dora_bases_kept_in_fp32_give_the_same_output_and_gradients_bit_for_bit():
    """peft's DoRA casts its base weight every forward: an fp32 copy saves a cast and changes no number."""
    torch.manual_seed(0)
    unet = build_tiny().unet.requires_grad_(False)
    freeze_base_layers(unet, torch.float16, torch.float32)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS["attn+ff+conv"], use_dora=True))
    for name, p in unet.named_parameters():
        if "lora_" in name:  # fp32 as the trainer keeps them; up-weights as trained, so the norm depends on them
            p.data = torch.randn(p.shape) * 0.1 if "lora_B" in name else p.data.float()
            p.requires_grad_(True)
    args = (torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 77, 32))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        return output_and_gradients(unet, args)

    before, grads = run()
    dora_linears = sum(isinstance(m.get_base_layer(), FrozenLinear) for m in unet.modules()
                       if getattr(m, "lora_magnitude_vector", None))
    assert keep_dora_bases_in(unet, torch.float32) == dora_linears > 0
    for module in unet.modules():
        if getattr(module, "lora_magnitude_vector", None):
            base = module.get_base_layer()
            assert base.weight.dtype == (torch.float32 if isinstance(base, FrozenLinear) else torch.float16)
    after, grads_after = run()
    assert torch.equal(before, after) and len(grads) == len(grads_after) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_after))
    assert keep_dora_bases_in(unet, torch.float32) == 0


@pytest.mark.parametrize("alpha", [4, 2])  # scale 2, and scale 1 (the multiply is left out)
def test_lean_lora_linears_compute_what_peft_computes_bit_for_bit_and_step_aside_when_disabled(alpha):
    """The trainer's lean forwards, for plain LoRA Linears and for diffusers' Attention: outputs and every
    gradient equal peft's and diffusers' own forwards; with the adapters disabled peft's forward runs (the
    base's output); DoRA layers are left to peft."""
    from training.trainable import lean_attention, lean_lora_linears

    torch.manual_seed(0)
    unet = build_tiny().unet.requires_grad_(False)
    freeze_base_layers(unet, torch.float16, torch.float32)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=alpha, target_modules=TARGETS["attn"]))
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape) * 0.1
            p.requires_grad_(True)
    args = (torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.randn(2, 77, 32))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        return output_and_gradients(unet, args)

    before, grads = run()
    lora_layers = sum(hasattr(m, "lora_A") for m in unet.modules())
    assert lean_lora_linears(unet) == lora_layers > 0
    after, grads_after = run()
    assert torch.equal(before, after) and len(grads) == len(grads_after) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_after))
    assert lean_lora_linears(unet) == 0  # already lean
    attention = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    assert lean_attention(unet) == len(attention) > 0 and lean_attention(unet) == 0
    lean_out, lean_grads = run()
    assert torch.equal(before, lean_out) and all(torch.equal(a, b) for a, b in zip(grads, lean_grads))
    # extra arguments go to diffusers' own forward, which drops (and names) those the processor does not take
    said = []
    log, handler = logging.getLogger("diffusers.models.attention_processor"), logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    level = log.level
    log.setLevel(logging.WARNING)
    log.addHandler(handler)
    try:
        with torch.no_grad():
            assert torch.equal(unet(*args, cross_attention_kwargs={"unused": 1}).sample, before.detach())
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert len(said) == len(attention) and all("['unused'] are not expected" in m for m in said), said
    unet.disable_adapters()
    with torch.no_grad():
        disabled = unet(*args).sample
    for module in unet.modules():
        if hasattr(module, "lora_A"):
            module.__class__ = module.__class__.__base__  # peft's own class again
    with torch.no_grad():
        assert torch.equal(disabled, unet(*args).sample) and not torch.equal(disabled, before)
    unet.enable_adapters()

    dora = build_tiny().unet.requires_grad_(False)
    dora.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS["attn"], use_dora=True))
    assert lean_lora_linears(dora) == 0
