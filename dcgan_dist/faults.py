"""Fault injection for the tests, in one place: every hook is an environment variable, read here only.
Unset (as always outside the tests), each hook does nothing.

    DCGAN_FAULT_OVERFLOW=STEP[,STEP...]  the backward pass of those steps (1-based, as logged) sees an
                                         infinite loss, as an fp16 overflow would (train/step.py)
    DCGAN_FAULT_SLOW_SAVE=STEP:SECONDS   holds the save of STEP half done, for the kill-during-save test
    DCGAN_FAULT_ENOSPC=STEP              rank 0's write of STEP fails as a full disk does, half-way through
"""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path


def overflow_steps() -> frozenset[int]:
    spec = os.environ.get("DCGAN_FAULT_OVERFLOW", "")
    return frozenset(int(s) for s in spec.split(",") if s.strip())


def during_save(step: int, writing: Path) -> None:
    """Called by every rank half-way through writing checkpoint `step`; `writing` is a file it writes."""
    spec = os.environ.get("DCGAN_FAULT_SLOW_SAVE", "")
    if spec and int(spec.split(":")[0]) == step:
        time.sleep(float(spec.split(":")[1]))
    if os.environ.get("DCGAN_FAULT_ENOSPC") == str(step) and os.environ.get("RANK", "0") == "0":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(writing))
