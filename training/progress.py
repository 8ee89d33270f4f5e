"""Progress reporting: the engine calls a callback, the shells (CLI, nodes) render it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Progress:
    """One progress event. `stage` names the work ("prepare", "class images", "train", ...).

    Training also sends "plan" (step 0, total 0; info: what the run is about to do) and, when it
    resumes, "resume" (the checkpoint's step; info: {"checkpoint": path}) before its first step."""

    stage: str
    step: int
    total: int
    info: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    """The default callback: report nothing."""


class Cancelled(Exception):
    """Raised by a progress callback to stop the work (the CLI on Ctrl-C/SIGTERM; ComfyUI's progress bar
    raises its own on Cancel). The one way to cancel: training saves a checkpoint at the current step
    and re-raises."""
