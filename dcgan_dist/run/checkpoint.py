"""Full training state on disk: save atomically, check before use, find the newest one every rank can read.

Layout of run_dir/checkpoints/step-00001000/ (and checkpoints/best/):
  nets.safetensors        G, D and the EMA generator: tensors "G.<name>", "D.<name>", "ema.<name>"
  optimizers.safetensors  both Adam states, "opt_g.<param index>.<key>"; their param groups in its metadata
  scaler.json             the fp16 GradScaler's state, when there is one
  rng-<rank>.json         each rank's random generators: Python, NumPy, torch CPU and CUDA
  trainer_state.json      step, kimg, W&B run id, best, counters (run/state.py)
  replicas.json           per-rank parameter digests
  generator.safetensors   the EMA generator on its own (run/snapshot.py)
  COMPLETE                written last: the format, the step, and every file's size and sha256

Nothing here is a pickle, and nothing is read before its size and sha256 match COMPLETE: a checkpoint
from a shared folder or a colleague can hold data, never code. Files not listed in COMPLETE are never
opened. A save goes to `.tmp-<name>/` and is renamed into place only after every file is written and
fsynced, so a kill at any moment leaves either the old set or the new one, never a half checkpoint.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from accelerate import Accelerator

from dcgan_dist.dist.collectives import broadcast_from_main, gather_all
from dcgan_dist.errors import RunStopped, UserError, warn
from dcgan_dist.fsutil import atomic_write_bytes, atomic_write_text, file_sha256, fsync_dir, safetensors_bytes
from dcgan_dist.run.layout import MARKER, STATE_FILE, RunLayout
from dcgan_dist.run.state import TrainerState

FORMAT = "dcgan-dist-checkpoint/2"
NETS, OPTIMIZERS, SCALER = "nets.safetensors", "optimizers.safetensors", "scaler.json"


def rng_file(rank: int) -> str:
    return f"rng-{rank}.json"


# ----------------------------------------------------------------------------------------------------
# Saving. `nets` is anything with modules() ({"G", "D", "ema"}) and optimizers() ({"opt_g", "opt_d"}).


def save(accelerator: Accelerator, final: Path, nets, state: TrainerState, extra: dict[str, bytes]) -> Path:
    """Collective: every rank writes its random states; rank 0 writes the rest (and `extra`, its own
    files), lists every file's digest in COMPLETE and renames the folder to `final`, replacing what was
    there. A write that fails on any rank (a full disk, a quota, a lost mount) stops every rank together
    with one line (RunStopped): the half-written folder is removed and the complete checkpoints stay."""
    tmp = final.with_name(f".tmp-{final.name}")
    main = accelerator.is_main_process

    def write_all() -> None:
        atomic_write_text(tmp / rng_file(accelerator.process_index), json.dumps(rng_state()))
        if main:
            atomic_write_bytes(tmp / NETS, safetensors_bytes(net_tensors(nets), {}))
            atomic_write_bytes(tmp / OPTIMIZERS, optimizer_bytes(nets))
            if accelerator.scaler is not None:
                atomic_write_text(tmp / SCALER, json.dumps(accelerator.scaler.state_dict()))
            atomic_write_text(tmp / STATE_FILE, state.to_json())
            for name, data in extra.items():
                atomic_write_bytes(tmp / name, data)

    def finalise() -> None:
        if main:
            files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())}
            marker = {"format": FORMAT, "step": state.step, "files": files}
            atomic_write_text(tmp / MARKER, json.dumps(marker, indent=1))
            _replace_dir(tmp, final)

    for part in (lambda: _fresh_dir(tmp) if main else None, write_all, finalise):
        _all_or_none(accelerator, part, tmp)
    return final


def net_tensors(nets) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for prefix, m in nets.modules().items() for k, v in m.state_dict().items()}


def optimizer_bytes(nets) -> bytes:
    tensors, groups = {}, {}
    for prefix, opt in nets.optimizers().items():
        state = opt.state_dict()
        for index, values in state["state"].items():
            for key, value in values.items():
                if not torch.is_tensor(value):
                    raise TypeError(f"{prefix} state '{key}' is a {type(value).__name__}, not a tensor")
                tensors[f"{prefix}.{index}.{key}"] = value
        groups[prefix] = state["param_groups"]
    return safetensors_bytes(tensors, {"param_groups": json.dumps(groups)})


def rng_state() -> dict:
    """This process's random generators as JSON: what a resumed run needs to draw the same noise."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    b64 = lambda s: base64.b64encode(s.numpy().tobytes()).decode()
    return {"python": [py_version, list(py_state), py_gauss],
            "numpy": [np_kind, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
            "torch": b64(torch.get_rng_state()),
            "cuda": [b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> Callable[[], None]:
    """`rng_state`'s JSON checked and parsed now (ValueError, TypeError or KeyError if it is not that);
    the returned call restores it."""
    py_version, py_state, py_gauss = state["python"]
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    as_bytes = lambda text: torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)
    py = (int(py_version), tuple(int(v) for v in py_state), None if py_gauss is None else float(py_gauss))
    numpy = (str(np_kind), np.asarray(np_keys, dtype=np.uint32), int(np_pos), int(np_has_gauss), float(np_gauss))
    cpu, cuda = as_bytes(state["torch"]), [as_bytes(s) for s in state["cuda"]]

    def restore() -> None:
        random.setstate(py)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda and torch.cuda.is_available():
            for device, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, device)
    return restore


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)      # left over from a save killed half-way
    path.mkdir(parents=True)


def _all_or_none(accelerator: Accelerator, write, tmp: Path) -> None:
    """Collective, and a barrier: run this rank's part of a save; if any rank's part failed with an
    OSError, remove the partial folder and raise the same RunStopped on every rank."""
    try:
        write()
        error = None
    except OSError as exc:
        error = f"{exc.strerror or exc}" + (f": '{exc.filename}'" if exc.filename else "")
    failed = [(rank, e) for rank, e in enumerate(gather_all(accelerator, error)) if e]
    if not failed:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)        # frees what it took, and leaves nothing half-written
    rank, reason = failed[0]
    kept = RunLayout(tmp.parent.parent).latest_checkpoint()
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
    best = RunLayout(run_dir).best
    old = best.with_name(f".old-{best.name}")
    if not best.exists() and (old / MARKER).is_file():
        os.replace(old, best)
    return best if (best / MARKER).is_file() else None


def rotate(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints. Never touches the newest one."""
    for _, path in RunLayout(run_dir).complete_checkpoints()[:-max(1, keep)]:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Loading


class Unreadable(ValueError):
    """A checkpoint file that is missing, altered or not what its name says."""


class OldLayout(UserError):
    """A checkpoint in a layout no release wrote (an early development version's, through Accelerate)."""


def read_marker(path: Path) -> dict:
    text = (path / MARKER).read_text()
    if not text.lstrip().startswith("{"):
        raise OldLayout(f"checkpoint {path} is in the layout of an early development version (Accelerate's "
                        "save_state), which this version does not read: move checkpoints/ aside to start over")
    marker = json.loads(text)
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict):
        raise Unreadable(f"{MARKER} is not a {FORMAT} marker")
    return marker


def read_file(path: Path, marker: dict, name: str) -> bytes:
    """The bytes of `name`, only if COMPLETE lists it with this size and sha256."""
    entry = marker["files"].get(name)
    if not isinstance(entry, dict):
        raise Unreadable(f"{name} is not listed in {MARKER}")
    altered = Unreadable(f"{name} does not match the size and sha256 in {MARKER} (altered or damaged)")
    if (path / name).stat().st_size != entry.get("bytes"):       # before reading: a size that does not fit
        raise altered
    data = (path / name).read_bytes()
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise altered
    return data


def load(accelerator: Accelerator, path: Path, nets) -> tuple[TrainerState, bool]:
    """Restore models, EMA, optimizers, scaler and this rank's random states from `path`. Returns
    (trainer_state, whether this rank's random states were there). Everything is read and checked
    before anything is changed."""
    from safetensors.torch import load as load_tensors

    marker, rank = read_marker(path), accelerator.process_index
    text = lambda name: read_file(path, marker, name).decode()
    try:
        state = TrainerState.from_json(text(STATE_FILE))
    except ValueError as exc:
        raise Unreadable(f"{STATE_FILE}: {exc}") from None
    tensors = load_tensors(read_file(path, marker, NETS))
    optim_bytes = read_file(path, marker, OPTIMIZERS)
    optim = _optimizer_states(load_tensors(optim_bytes), json.loads(_metadata(optim_bytes)["param_groups"]))
    scaler = json.loads(text(SCALER)) if SCALER in marker["files"] else None
    restore_rng = set_rng_state(json.loads(text(rng_file(rank)))) if rng_file(rank) in marker["files"] else None
    for prefix, module in nets.modules().items():
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    for prefix, opt in nets.optimizers().items():
        opt.load_state_dict(optim[prefix])
        _match_layouts(opt)
    if accelerator.scaler is not None and scaler is not None:
        accelerator.scaler.load_state_dict(scaler)    # written without fp16 (bf16, fp32): the scaler starts fresh
    if restore_rng is not None:
        restore_rng()
    return state, restore_rng is not None


def _metadata(data: bytes) -> dict:
    """The metadata of safetensors bytes: the format is an 8-byte header length, then a JSON header."""
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= len(data) - 8:
        raise Unreadable("a safetensors header that does not fit the file")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def _optimizer_states(tensors: dict[str, torch.Tensor], groups: dict) -> dict[str, dict]:
    """{"opt_g": state_dict, "opt_d": state_dict} from the flat tensors and the param groups."""
    out = {prefix: {"state": {}, "param_groups": groups[prefix]} for prefix in ("opt_g", "opt_d")}
    for key, value in tensors.items():
        prefix, index, name = key.split(".", 2)
        out[prefix]["state"].setdefault(int(index), {})[name] = value
    return out


def _match_layouts(opt: torch.optim.Optimizer) -> None:
    """Give each Adam moment its parameter's memory layout. Saved tensors are contiguous (safetensors
    stores no strides), while channels_last weights have channels_last moments, and the fused kernel
    walks both in storage order: a mismatch would pair every weight with another's moments."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def resume(accelerator: Accelerator, run_dir: str | Path, nets) -> tuple[Optional[Path], Optional[TrainerState], bool]:
    """Load the newest checkpoint that every rank can read: (its path, trainer_state, whether this rank's
    random states were in it), or (None, None, False) for a fresh start.

    Rank 0 lists the checkpoints and every rank tries the same one, by name, in its own view of
    run_dir: on shared storage one machine may not see the newest checkpoint yet. If any rank cannot
    read it, all fall back to the one before together, and rank 0 names it and why. If checkpoints
    exist but none loads, stop rather than silently start over and rotate the user's checkpoints away.
    """
    layout = RunLayout(run_dir)
    names = broadcast_from_main(accelerator, [p.name for _, p in layout.complete_checkpoints(warn_incomplete=True)])
    for name in reversed(names):
        path = layout.checkpoints / name
        try:
            state, own_rng = load(accelerator, path, nets)
            error = None
        except OldLayout as exc:
            state, own_rng, error = None, False, ("old", str(exc))
        except Exception as exc:  # noqa: BLE001 - missing, truncated, altered or foreign files
            state, own_rng, error = None, False, ("unreadable", _reason(exc))
        errors = gather_all(accelerator, error, startup=True)
        if not any(errors):
            return path, state, own_rng
        rank, (kind, reason) = next((r, e) for r, e in enumerate(errors) if e)
        if kind == "old":
            raise OldLayout(reason)
        where = f"rank {rank}: " if accelerator.num_processes > 1 else ""
        warn(f"skipping unreadable checkpoint {path} ({where}{reason}); trying the one before")
    if names:
        raise UserError(f"no loadable checkpoint in '{layout.checkpoints}' (tried {len(names)}); move them "
                        "away to start over")
    return None, None, False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {Path(exc.filename or '?').name}"
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"
