"""Frozen base layers for LoRA training: stored at the precision the base came in, computed
in the training precision, and keeping nothing for backward but their weights.

A LoRA run trains a few million parameters on top of a UNet of 860 million that never change.
Two savings follow, neither of which changes a single number the loop computes:

- storage: a base file stored in fp16 (most SD1.5 checkpoints are) keeps its Linear and Conv2d
  weights in fp16 and casts each to the compute precision when the layer runs; fp16 -> fp32 is
  exact, so the result is the one an fp32 copy of the same file gives, at half the memory;
- activations: PyTorch's convolution keeps its input for backward even when its weight takes
  no gradient; a frozen layer needs only its weight to pass the gradient on to its input.

`freeze_base_layers(unet, storage_dtype, compute_dtype)` swaps the class of frozen nn.Linear /
nn.Conv2d layers (the ones peft wraps included), so isinstance checks, state dicts and peft keep
working.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = _compute_dtype(x)
        ctx.save_for_backward(weight)
        return F.linear(_cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        return grad @ _cast(weight, grad.dtype), None, None


class _Conv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        dtype = _compute_dtype(x)
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(_cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        grad_input = torch.nn.grad.conv2d_input(shape, _cast(weight, grad.dtype), grad, stride, padding, dilation,
                                                groups)
        return (grad_input,) + (None,) * 6


# peft builds a LoRA's own conv factors with the class of the layer it wraps, so a frozen
# twin may hold trainable weights: those run as the plain layer.


class FrozenLinear(torch.nn.Linear):
    """An nn.Linear whose weight takes no gradient (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            return super().forward(x)
        return _LinearFn.apply(x, self.weight, self.bias)


class FrozenConv2d(torch.nn.Conv2d):
    """An nn.Conv2d (zero padding) whose weight takes no gradient (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            return super().forward(x)
        return _Conv2dFn.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


_FROZEN = {torch.nn.Linear: FrozenLinear, torch.nn.Conv2d: FrozenConv2d}
# In one precision a plain Linear already keeps only its weight, and a narrow conv's input is
# small: measured on `tiny` (32-64 channels) swapping its convs made a step ~13% slower, on the
# SD1.5 UNet (320-1280 channels) it cost nothing and kept ~1 GB less at 256 px.
MIN_CONV_CHANNELS = 256


def _twin(layer: torch.nn.Module, casting: bool) -> type | None:
    """The frozen class `layer` becomes, or None where it stays as it is."""
    frozen = _FROZEN.get(type(layer))
    if frozen is None or any(p.requires_grad for p in layer.parameters(recurse=False)):
        return None
    if frozen is FrozenConv2d and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        return None  # conv2d_input takes numeric zero padding only
    if not casting and (frozen is FrozenLinear or layer.in_channels < MIN_CONV_CHANNELS):
        return None  # nothing to cast: swap only where it saves memory worth a Python call per run
    return frozen


def freeze_base_layers(module: torch.nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """Swap every frozen Linear / zero-padded Conv2d of `module` for its frozen twin with weights in
    `storage_dtype`; every other floating parameter and buffer goes to `compute_dtype` (norms
    and embeddings are small, and their kernels want the input's precision). Returns the count
    of swapped layers. In a model, the layer of the first parameter stays plain, in `compute_dtype`:
    diffusers takes a model's dtype from its first parameter and casts pipeline inputs to it."""
    owners = (m for m in module.modules() if any(True for _ in m.parameters(recurse=False)))
    first = next(owners, None) if type(module) not in _FROZEN else None
    swapped = 0
    for layer in module.modules():
        frozen = _twin(layer, casting=storage_dtype != compute_dtype) if layer is not first else None
        if frozen is not None:
            layer.__class__ = frozen
            for p in layer.parameters(recurse=False):
                p.data = _cast(p.data, storage_dtype)
            swapped += 1
            continue
        for p in layer.parameters(recurse=False):
            if p.is_floating_point() and not p.requires_grad:
                p.data = _cast(p.data, compute_dtype)
        for name, b in layer.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(layer, name, _cast(b, compute_dtype))
    return swapped


def keep_dora_bases_in(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the base weight of every peft DoRA Linear of `module` (a frozen twin) in `dtype`, the precision
    it computes in; returns how many were cast. peft's DoRA casts that weight to the input's precision every
    forward for its norm, so a half-precision copy would be cast twice a forward (there and in the twin); the
    cast is exact, so nothing computed changes. (A DoRA conv allocates its sum with the delta either way.)"""
    cast = 0
    for layer in module.modules():
        base = layer.get_base_layer() if getattr(layer, "lora_magnitude_vector", None) else None
        if isinstance(base, FrozenLinear) and base.weight.dtype != dtype:
            base.weight.data = base.weight.data.to(dtype)
            cast += 1
    return cast
