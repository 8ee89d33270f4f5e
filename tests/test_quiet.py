"""Tests for training/quiet.py: libraries print nothing but errors inside quiet_libraries(), and every
setting is restored after it."""
from __future__ import annotations

import logging
import warnings

import pytest

from training.quiet import quiet_libraries


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_library_logs_are_quiet_inside_and_restored_after():
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    logger = transformers_logging.get_logger("transformers.test_quiet")
    records = _Records()
    logger.addHandler(records)
    before = logging.getLogger("transformers").level
    bars = transformers_logging.is_progress_bar_enabled()
    try:
        with quiet_libraries():
            logger.warning("inside")
            logger.error("an error still shows")
            assert not transformers_logging.is_progress_bar_enabled()
            assert logging.getLogger("diffusers").getEffectiveLevel() == logging.ERROR
        logger.warning("after")
    finally:
        logger.removeHandler(records)
    assert records.messages == ["an error still shows", "after"]
    assert logging.getLogger("transformers").level == before
    assert transformers_logging.is_progress_bar_enabled() == bars


def test_python_warnings_are_ignored_inside():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_libraries():
            warnings.warn("inside", UserWarning)
        warnings.warn("outside", UserWarning)
    assert [str(w.message) for w in caught] == ["outside"]
