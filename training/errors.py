"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """Bad input: the message is one plain sentence naming the input and what to do.

    The CLI prints it as one line and exits non-zero; the nodes show it on the node.
    Programming errors are never wrapped in it: they stay tracebacks.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
