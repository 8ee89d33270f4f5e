"""What a GPU run gets by default, checked on the CPU: attention through PyTorch's fused SDPA kernel."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from training.models import build_tiny
from training.train import train
from training.train_config import TrainConfig

PHOTOS = Path(__file__).resolve().parent.parent / "training" / "sample_data" / "subject"


def test_training_attention_runs_through_sdpa(tmp_path):
    """diffusers' AttnProcessor2_0 calls F.scaled_dot_product_attention, which picks the flash or
    memory-efficient kernel on a GPU in fp16/bf16; the older AttnProcessor builds the score matrix
    with baddbmm + softmax and keeps it for backward."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = build_tiny()
    cfg = TrainConfig(instance_dir=str(PHOTOS), output=str(tmp_path / "a.safetensors"), steps=1, rank=4,
                      save_every=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(cfg, model=model)
    ops = {e.key for e in prof.key_averages()}
    processors = model.unet.attn_processors
    assert processors and {type(p) for p in processors.values()} == {AttnProcessor2_0}
    # a backward through SDPA happens only in the training step (the VAE's attention runs under no_grad)
    assert any("scaled_dot_product" in op and "backward" in op for op in ops), sorted(ops)[:50]
    assert "aten::baddbmm" not in ops
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


def test_auto_precision_takes_bf16_only_where_it_is_native(monkeypatch):
    """A T4 or V100 (compute capability 7) creates bf16 tensors, but emulates bf16 math: fp16 there."""
    from training.train_config import resolve_precision

    def bf16_on(major: int):
        return lambda including_emulation=True: major >= 8 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_on(7))
    assert resolve_precision("auto") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_on(9))
    assert resolve_precision("auto") == "bf16"
    assert resolve_precision("no") == "no"
