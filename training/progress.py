"""Progress reporting: the engine calls a callback, the shells (CLI, nodes) render it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


@dataclass
class Progress:
    """One progress event. `stage` names the work ("prepare", "class images", "train", ...)."""

    stage: str
    step: int
    total: int
    info: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    """The default callback: report nothing."""


class Cancelled(Exception):
    """Raised by a progress callback (or a cancel hook) to stop work cleanly."""


class CancelHook(Protocol):
    def __call__(self) -> bool: ...
