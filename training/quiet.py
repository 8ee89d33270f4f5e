"""The engine never prints: one switch that keeps libraries' info logs, warnings and loading bars quiet."""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

# Their own loggers (transformers.utils.logging and diffusers.utils.logging set these levels).
LIBRARY_LOGGERS = ("transformers", "diffusers")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside the block: transformers/diffusers log errors only, their loading bars are off, Python warnings
    (e.g. PIL's DecompressionBombWarning) are ignored and OpenCV logs errors only; all restored after.
    Nothing is imported here: a library not loaded yet is left alone (importing one costs seconds)."""
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in LIBRARY_LOGGERS:
            utils = sys.modules.get(f"{name}.utils.logging")
            if utils is not None:
                utils.get_verbosity()  # configures the library's logger once, so it cannot reset our level later
            logger = logging.getLogger(name)
            stack.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
        hf = sys.modules.get("transformers.utils.logging")
        if hf is not None and hf.is_progress_bar_enabled():
            hf.disable_progress_bar()
            stack.callback(hf.enable_progress_bar)
        cv2 = sys.modules.get("cv2")
        if cv2 is not None and hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):
            stack.callback(cv2.utils.logging.setLogLevel, cv2.utils.logging.getLogLevel())
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # it warns about DNN targets on stderr
        yield
