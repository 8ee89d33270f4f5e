"""The one exception type for mistakes a user can fix, and how messages list names."""


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
