"""The one exception type for mistakes a user can fix, and how messages name inputs and list names."""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator


class UserError(Exception):
    """Bad input: the message is one plain sentence naming the input and what to do.

    The CLI prints it as one line and exits non-zero; the nodes show it on the node.
    Programming errors are never wrapped in it: they stay tracebacks.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def name_list(names: list[str], limit: int = 3) -> str:
    """`a, b, c (+2 more)`: the first `limit` names, for a message that must stay one line."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


_input_names: ContextVar[Callable[[str], str]] = ContextVar("input_names", default=str)


def input_name(field: str) -> str:
    """A config field as the user's surface names it: the field itself (a node's widget), or on the
    command line its flag (`instance_dir` -> `--instance-dir`)."""
    return _input_names.get()(field)


def turn_on(field: str) -> str:
    """How a message asks for an on/off input: 'turn on overwrite' (a node), 'pass --overwrite' (the CLI)."""
    name = input_name(field)
    return f"pass {name}" if name.startswith("--") else f"turn on {name}"


@contextlib.contextmanager
def inputs_named_by(name: Callable[[str], str]) -> Iterator[None]:
    """Within: messages name config fields by `name` (the CLI passes its flag function)."""
    token = _input_names.set(name)
    try:
        yield
    finally:
        _input_names.reset(token)
