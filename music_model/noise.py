"""Library messages that are known and harmless for our use, dropped where they arise unless
`$MUSIC_VERBOSE` is set (`music --verbose`; inherited by workers, their flow runs and Ray tasks).
Each call site says why its message is harmless; warnings that mean something stay, or become one
line of our own."""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from music_model import settings


def verbose() -> bool:
    return settings.VERBOSE.flag()


def drop_warning(message: str, category: type[Warning]) -> None:
    """Ignore `warnings.warn(category)` calls whose message starts with `message`."""
    if not verbose():
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)


class _Drop(logging.Filter):
    def __init__(self, fragment: str, level: int):
        super().__init__()
        self.fragment, self.level = fragment, level

    def filter(self, record: logging.LogRecord) -> bool:
        return verbose() or record.levelno > self.level or self.fragment not in record.getMessage()


def drop_log(logger: str, fragment: str, level: int = logging.WARNING) -> None:
    """Drop records of `logger` (the exact logger that emits them) at `level` or below whose message
    contains `fragment`; once per (logger, fragment) however often it is called."""
    target = logging.getLogger(logger)
    if not any(isinstance(f, _Drop) and f.fragment == fragment for f in target.filters):
        target.addFilter(_Drop(fragment, level))


def quiet_progress_bars() -> None:
    """Per-file weight loading and saving bars drown the run's own lines. transformers reads
    HF_HUB_DISABLE_PROGRESS_BARS at import, here and in every process started from here; diffusers
    has no such variable: its switch is turned off when it is loaded."""
    if verbose():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for library in ("transformers", "diffusers"):
        if library in sys.modules:
            sys.modules[library].utils.logging.disable_progress_bar()
