"""Resumable training checkpoints: trainable weights, optimizer, LR schedule and step,
all in one safetensors file (tensors) with JSON metadata (everything else). No pickle."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import UserError
from .safe_io import atomic_save_safetensors

KEEP = 2
_NAME = re.compile(r"step_(\d{7})\.safetensors$")


@dataclass
class TrainState:
    step: int
    weights: dict[str, torch.Tensor]  # trainable parameters by name
    optimizer: dict
    scheduler: dict
    losses: list[dict]  # the loss log so far, so a resumed run's curve is whole
    config_json: str
    fingerprint: str  # config + inputs; a checkpoint resumes only the run that wrote it


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temp files of an interrupted save are ignored)."""
    folder = checkpoint_dir(run_dir)
    found = [p for p in folder.glob("step_*.safetensors") if _NAME.search(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.search(p.name)[1]))


def save_checkpoint(run_dir: Path, state: TrainState) -> Path:
    """Write `step_NNNNNNN.safetensors` atomically, then drop all but the last two."""
    tensors = {f"weights/{k}": v.detach().contiguous().cpu() for k, v in state.weights.items()}
    opt_tensors, opt_rest = _split_optimizer(state.optimizer)
    tensors |= opt_tensors
    meta = {
        "step": str(state.step),
        "optimizer": json.dumps(opt_rest),
        "scheduler": json.dumps(state.scheduler),
        "losses": json.dumps(state.losses),
        "config": state.config_json,
        "fingerprint": state.fingerprint,
    }
    path = atomic_save_safetensors(tensors, checkpoint_dir(run_dir) / f"step_{state.step:07d}.safetensors", meta)
    for old in list_checkpoints(run_dir)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def remove_checkpoints(run_dir: Path) -> None:
    for path in list_checkpoints(run_dir):
        path.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> TrainState:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        raise UserError(f"The checkpoint {path} is unreadable; delete it to resume from the one before.") from None
    weights = {k.removeprefix("weights/"): v for k, v in tensors.items() if k.startswith("weights/")}
    optimizer = _join_optimizer({k: v for k, v in tensors.items() if k.startswith("opt/")}, json.loads(meta["optimizer"]))
    return TrainState(int(meta["step"]), weights, optimizer, json.loads(meta["scheduler"]),
                      json.loads(meta["losses"]), meta["config"], meta.get("fingerprint", ""))


def _split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for idx, entry in state_dict["state"].items():
        rest["state"][str(idx)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt/{idx}/{name}"] = value.detach().contiguous().cpu()
            else:
                rest["state"][str(idx)][name] = value
    return tensors, rest


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state = {int(idx): dict(values) for idx, values in rest["state"].items()}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}
