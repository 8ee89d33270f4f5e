"""Memory estimate, the warning before training, and the out-of-memory stop."""
from pathlib import Path

import pytest
import torch

import training.train as train_module
from training.checkpoint import list_checkpoints
from training.data import PrepareConfig, prepare_dataset
from training.errors import UserError
from training.models import build_tiny
from training.resources import estimate_memory, memory_warning
from training.train import train
from training.train_config import TrainConfig

PHOTOS = Path(__file__).resolve().parent.parent / "training" / "sample_data" / "subject"


def test_estimate_grows_with_what_costs_memory(tiny):
    base = estimate_memory(TrainConfig(), tiny, 512)
    assert estimate_memory(TrainConfig(batch_size=4), tiny, 512).total > base.total
    assert estimate_memory(TrainConfig(), tiny, 1024).activations == pytest.approx(4 * base.activations)
    assert estimate_memory(TrainConfig(gradient_checkpointing=True), tiny, 512).activations < base.activations
    assert estimate_memory(TrainConfig(method="dreambooth"), tiny, 512).training_state > 10 * base.training_state


def test_warning_names_the_settings_to_lower(tiny, monkeypatch):
    monkeypatch.setattr("training.resources.available_memory", lambda device: (1024.0, "system memory"))
    message = memory_warning(TrainConfig(method="dreambooth", batch_size=2), tiny, 512, torch.device("cpu"))
    assert message and "GB" in message and "batch_size 1" in message and "gradient_checkpointing on" in message
    monkeypatch.setattr("training.resources.available_memory", lambda device: (1e15, "system memory"))
    assert memory_warning(TrainConfig(), tiny, 512, torch.device("cpu")) is None


def test_out_of_memory_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    dataset = tmp_path / "dataset"
    prepare_dataset(PHOTOS, dataset, PrepareConfig(resolution=64))
    real_loss, calls = train_module.denoising_loss, []

    def loss_that_runs_out(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_loss(*args, **kw)

    monkeypatch.setattr(train_module, "denoising_loss", loss_that_runs_out)
    warnings = []
    cfg = TrainConfig(instance_dir=str(dataset), output=str(tmp_path / "oom.safetensors"), steps=10, rank=4,
                      prior_preservation=False, save_every=2)
    with pytest.raises(UserError) as err:
        train(cfg, progress=lambda e: warnings.append(e) if e.stage == "warning" else None, model=build_tiny())
    message = str(err.value)
    assert message.startswith("Out of memory at step 4") and "step_0000002" in message and "\n" not in message
    assert "gradient_checkpointing on" in message
    assert [p.name for p in list_checkpoints(cfg.run_path)] == ["step_0000002.safetensors"]
    assert not (tmp_path / "oom.safetensors").exists()


def test_dreambooth_that_does_not_fit_turns_on_checkpointing_then_8bit_adam(tiny):
    from training.resources import GB, fit_to_memory

    need = estimate_memory(TrainConfig(method="dreambooth"), tiny, 512).total
    checkpointed = estimate_memory(TrainConfig(method="dreambooth", gradient_checkpointing=True), tiny, 512).total
    roomy = TrainConfig(method="dreambooth")
    assert fit_to_memory(roomy, tiny, 512, need * 1.01, "GPU", eight_bit_adam=True) == []
    assert not roomy.gradient_checkpointing and roomy.optimizer == "adamw"

    short = TrainConfig(method="dreambooth")  # checkpointing alone makes it fit
    notes = fit_to_memory(short, tiny, 512, (need + checkpointed) / 2, "GPU", eight_bit_adam=True)
    assert short.gradient_checkpointing and short.optimizer == "adamw"
    assert len(notes) == 1 and notes[0].startswith("Gradient checkpointing is on") and f"{need / GB:.1f} GB" in notes[0]

    shorter = TrainConfig(method="dreambooth")
    notes = fit_to_memory(shorter, tiny, 512, checkpointed * 0.9, "GPU", eight_bit_adam=True)
    assert shorter.gradient_checkpointing and shorter.optimizer == "adamw8bit" and len(notes) == 2
    no_bnb = TrainConfig(method="dreambooth")  # no bitsandbytes (or the CPU): AdamW stays, the warning follows
    assert len(fit_to_memory(no_bnb, tiny, 512, checkpointed * 0.9, "GPU", eight_bit_adam=False)) == 1
    assert no_bnb.optimizer == "adamw"

    resumed = TrainConfig(method="dreambooth")  # the optimizer of the checkpoint, whatever the memory now
    fit_to_memory(resumed, tiny, 512, need * 10, "GPU", eight_bit_adam=True, resumed_optimizer="adamw8bit")
    assert resumed.optimizer == "adamw8bit"
    lora = TrainConfig(method="lora")  # LoRA's memory is activations: left as set
    assert fit_to_memory(lora, tiny, 512, 1.0, "GPU", eight_bit_adam=True) == [] and not lora.gradient_checkpointing
