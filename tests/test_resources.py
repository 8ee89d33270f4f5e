"""Memory estimate, the warning before training, and the out-of-memory stop."""
from pathlib import Path

import pytest
import torch

import training.train as train_module
from training.checkpoint import list_checkpoints
from training.dataset import PrepareConfig, prepare_dataset
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
    real_loss, calls = train_module._loss, []

    def loss_that_runs_out(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_loss(*args, **kw)

    monkeypatch.setattr(train_module, "_loss", loss_that_runs_out)
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
