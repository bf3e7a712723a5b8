"""Full training state on disk: save atomically, find the latest complete one, rotate.

Layout: run_dir/checkpoints/step-00001000/ holds Accelerate's state (both models, both optimizers, the
grad scaler, every rank's RNG states), `trainer_state.json` (step, kimg, W&B run id, ...),
`replicas.json` (per-rank parameter digests) and, last, the marker `COMPLETE`.

A save goes to `.tmp-step-XXXXXXXX/` and is renamed into place only after every file is written and
fsynced, so a kill at any moment leaves either the old set or the new one, never a half checkpoint
under a real name.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from accelerate.utils import gather_object

from dcgan_dist.errors import RunStopped, UserError
from dcgan_dist.fsutil import atomic_write_bytes, atomic_write_text, fsync_dir
from dcgan_dist.layout import MARKER, STATE_FILE, RunLayout

def checkpoint_root(run_dir: str | Path) -> Path:
    return RunLayout.of(run_dir).checkpoints


def step_dir(run_dir: str | Path, step: int) -> Path:
    return RunLayout.of(run_dir).step_dir(step)


def list_complete(run_dir: str | Path, warn: bool = False) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first. Incomplete ones are skipped."""
    return RunLayout.of(run_dir).complete_checkpoints(warn)


def latest(run_dir: str | Path, warn: bool = True) -> Optional[Path]:
    done = list_complete(run_dir, warn=warn)
    return done[-1][1] if done else None


def _fsync_tree(path: Path) -> None:
    for sub in sorted(path.rglob("*")):
        if sub.is_file():
            with open(sub, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def save(accelerator: Accelerator, run_dir: str | Path, step: int, trainer_state: dict, replicas: dict,
         keep: int, best: bool = False, extra_files: Optional[dict[str, bytes]] = None) -> Path:
    """Collective: every rank must call it. Rank 0 finalises, renames and rotates. With `best`, the
    state goes to checkpoints/best/ instead, replacing the previous best; rotation never touches it.
    `extra_files` (rank 0's) are written inside, before the COMPLETE marker.

    A write that fails on any rank (a full disk, a quota, a lost mount) stops every rank together with
    one line (RunStopped): the half-written folder is removed and the previous checkpoints stay as they
    were, complete."""
    final = RunLayout.of(run_dir).best if best else step_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    main = accelerator.is_main_process

    def write_all() -> None:
        accelerator.save_state(str(tmp), safe_serialization=True)   # every rank writes its RNG states
        _fault_injection(step, tmp)
        if main:
            atomic_write_text(tmp / STATE_FILE, json.dumps(trainer_state, indent=1, sort_keys=True))
            atomic_write_text(tmp / "replicas.json", json.dumps(replicas, indent=1, sort_keys=True))
            for name, data in (extra_files or {}).items():
                atomic_write_bytes(tmp / name, data)
            _fsync_tree(tmp)

    def finalise() -> None:
        if main:
            atomic_write_text(tmp / MARKER, f"step {step}\n")
            _replace_dir(tmp, final)
            if not best:
                rotate(run_dir, keep)

    _all_or_none(accelerator, lambda: _fresh_dir(tmp) if main else None, tmp, run_dir)
    _all_or_none(accelerator, write_all, tmp, run_dir)
    _all_or_none(accelerator, finalise, tmp, run_dir)
    return final


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)      # left over from a save killed half-way
    path.mkdir(parents=True)


def _all_or_none(accelerator: Accelerator, write, tmp: Path, run_dir: str | Path) -> None:
    """Collective, and a barrier: run this rank's part of a save; if any rank's part failed with an
    OSError, remove the partial folder and raise the same RunStopped on every rank."""
    try:
        write()
        error = None
    except OSError as exc:
        error = f"{exc.strerror or exc}" + (f": '{exc.filename}'" if exc.filename else "")
    errors = gather_object([error]) if accelerator.num_processes > 1 else [error]
    failed = [(rank, e) for rank, e in enumerate(errors) if e]
    if not failed:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)        # frees what it took, and leaves nothing half-written
    rank, reason = failed[0]
    kept = latest(run_dir, warn=False)
    raise RunStopped(f"could not write checkpoint '{tmp.name.removeprefix('.tmp-')}' in '{tmp.parent}' (rank {rank}: "
                     f"{reason}); stopping. The newest complete checkpoint is {kept or 'none'}: free space "
                     "and rerun the same command to resume from it")


def _replace_dir(new: Path, final: Path) -> None:
    """Put `new` at `final`. An existing `final` (a re-save of the same step, or the previous best) is
    moved aside first and deleted last: a kill in between leaves it under `.old-<name>`, where
    `recover_best` finds it, so there is always a complete one on disk."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_best(run_dir: str | Path) -> Optional[Path]:
    """checkpoints/best if complete, after undoing a replacement killed half-way; else None."""
    best = RunLayout.of(run_dir).best
    old = best.with_name(f".old-{best.name}")
    if not best.exists() and (old / MARKER).is_file():
        os.replace(old, best)
    return best if (best / MARKER).is_file() else None


def _fault_injection(step: int, tmp: Path) -> None:
    """Test hooks, read from the environment:
    DCGAN_FAULT_SLOW_SAVE=STEP:SECONDS holds the save of STEP half done, for the kill-during-save test;
    DCGAN_FAULT_ENOSPC=STEP makes rank 0's write of STEP fail as a full disk does, half-way through."""
    spec = os.environ.get("DCGAN_FAULT_SLOW_SAVE", "")
    if spec and int(spec.split(":")[0]) == step:
        time.sleep(float(spec.split(":")[1]))
    if os.environ.get("DCGAN_FAULT_ENOSPC") == str(step) and os.environ.get("RANK", "0") == "0":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / STATE_FILE))


def rotate(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints. Never touches the newest one."""
    done = list_complete(run_dir)
    for _, path in done[:-max(1, keep)]:
        shutil.rmtree(path, ignore_errors=True)


def load(accelerator: Accelerator, path: Path) -> dict:
    """Restore models, optimizers, scaler and this rank's RNG states; return trainer_state."""
    state = json.loads((path / STATE_FILE).read_text())
    scaler = accelerator.scaler
    if scaler is not None and not (path / "scaler.pt").is_file():
        accelerator.scaler = None        # written without fp16 (bf16 or fp32): the new scaler starts fresh
    try:
        accelerator.load_state(str(path))
    finally:
        accelerator.scaler = scaler
    return state


def resume(accelerator: Accelerator, run_dir: str | Path) -> tuple[Optional[Path], Optional[dict]]:
    """Load the newest checkpoint that every rank can read; skip (and name) the ones that fail.

    Ranks agree after each try, so they never resume from different checkpoints. If checkpoints exist
    but none loads, stop rather than silently start over and rotate the user's checkpoints away.
    """
    candidates = list_complete(run_dir, warn=accelerator.is_main_process)
    for _, path in reversed(candidates):
        try:
            state, error = load(accelerator, path), None
        except Exception as exc:  # noqa: BLE001 - truncated, corrupt or foreign files
            state, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        errors = gather_object([error]) if accelerator.num_processes > 1 else [error]
        if not any(errors):
            return path, state
        if accelerator.is_main_process:
            reason = next(e for e in errors if e)
            print(f"warning: skipping unreadable checkpoint {path} ({reason}); trying the one before",
                  file=sys.stderr, flush=True)
    if candidates:
        raise UserError(f"no loadable checkpoint in '{checkpoint_root(run_dir)}' (tried "
                        f"{len(candidates)}); move them away to start over")
    return None, None
