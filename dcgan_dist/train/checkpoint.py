"""Full training state on disk: save atomically, check before use, find the latest complete one, rotate.

Layout of run_dir/checkpoints/step-00001000/ (and checkpoints/best/):
  nets.safetensors        G, D and the EMA generator: tensors "G.<name>", "D.<name>", "ema.<name>"
  optimizers.safetensors  both Adam states, "opt_g.<param index>.<key>"; their param groups in its metadata
  scaler.json             the fp16 GradScaler's state, when there is one
  rng-<rank>.json         each rank's random generators: Python, NumPy, torch CPU and CUDA
  trainer_state.json      step, kimg, W&B run id, best, counters
  replicas.json           per-rank parameter digests
  generator.safetensors   the EMA generator on its own (snapshot.py)
  COMPLETE                written last: the format, the step, and every file's size and sha256

Nothing here is a pickle, and nothing is read before its size and sha256 match COMPLETE: a checkpoint
from a shared folder or a colleague can hold data, never code. Files not listed in COMPLETE are never
opened. Checkpoints in the layout of earlier versions (Accelerate's: model.safetensors,
optimizer.bin, random_states_N.pkl, custom_checkpoint_0.pkl) are still resumed from, every pickle in
them loaded with torch's weights_only loader, which refuses anything but tensors and plain containers.

A save goes to `.tmp-step-XXXXXXXX/` and is renamed into place only after every file is written and
fsynced, so a kill at any moment leaves either the old set or the new one, never a half checkpoint
under a real name.
"""
from __future__ import annotations

import base64
import codecs
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator

from dcgan_dist import faults
from dcgan_dist.errors import RunStopped, UserError
from dcgan_dist.fsutil import atomic_write_bytes, atomic_write_text, file_sha256, fsync_dir
from dcgan_dist.layout import MARKER, STATE_FILE, RunLayout
from dcgan_dist.train import dist
from dcgan_dist.train.state import TrainerState
from dcgan_dist.train.step import Nets

FORMAT = "dcgan-dist-checkpoint/2"
NETS, OPTIMIZERS, SCALER = "nets.safetensors", "optimizers.safetensors", "scaler.json"


def rng_file(rank: int) -> str:
    return f"rng-{rank}.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    return RunLayout.of(run_dir).checkpoints


def step_dir(run_dir: str | Path, step: int) -> Path:
    return RunLayout.of(run_dir).step_dir(step)


def list_complete(run_dir: str | Path, warn: bool = False) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first. Incomplete ones are skipped."""
    return RunLayout.of(run_dir).complete_checkpoints(warn)


# ----------------------------------------------------------------------------------------------------
# Saving


def save(accelerator: Accelerator, run_dir: str | Path, step: int, nets: Nets, trainer_state: TrainerState,
         replicas: dict, keep: int, best: bool = False, extra_files: Optional[dict[str, bytes]] = None) -> Path:
    """Collective: every rank must call it. Every rank writes its random states; rank 0 writes the
    rest, lists every file's digest in COMPLETE, renames and rotates. With `best`, the state goes to
    checkpoints/best/ instead, replacing the previous best; rotation never touches it. `extra_files`
    (rank 0's) are written inside too.

    A write that fails on any rank (a full disk, a quota, a lost mount) stops every rank together with
    one line (RunStopped): the half-written folder is removed and the previous checkpoints stay as they
    were, complete."""
    final = RunLayout.of(run_dir).best if best else step_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    main = accelerator.is_main_process

    def write_all() -> None:
        atomic_write_text(tmp / rng_file(accelerator.process_index), json.dumps(rng_state()))
        faults.during_save(step, tmp / STATE_FILE)
        if main:
            atomic_write_bytes(tmp / NETS, _tensor_bytes(net_tensors(nets)))
            atomic_write_bytes(tmp / OPTIMIZERS, optimizer_bytes(nets))
            if accelerator.scaler is not None:
                atomic_write_text(tmp / SCALER, json.dumps(accelerator.scaler.state_dict()))
            atomic_write_text(tmp / STATE_FILE, trainer_state.to_json())
            atomic_write_text(tmp / "replicas.json", json.dumps(replicas, indent=1, sort_keys=True))
            for name, data in (extra_files or {}).items():
                atomic_write_bytes(tmp / name, data)

    def finalise() -> None:
        if main:
            files = {p.name: _describe(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            atomic_write_text(tmp / MARKER, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
            _replace_dir(tmp, final)
            if not best:
                rotate(run_dir, keep)

    _all_or_none(accelerator, lambda: _fresh_dir(tmp) if main else None, tmp, run_dir)
    _all_or_none(accelerator, write_all, tmp, run_dir)
    _all_or_none(accelerator, finalise, tmp, run_dir)
    return final


def _modules(nets: Nets) -> dict[str, torch.nn.Module]:
    return {"G": nets.G_local, "D": nets.D_local, "ema": nets.ema.module}


def net_tensors(nets: Nets) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for prefix, m in _modules(nets).items() for k, v in m.state_dict().items()}


def optimizer_bytes(nets: Nets) -> bytes:
    tensors, groups = {}, {}
    for prefix, opt in (("opt_g", nets.opt_g), ("opt_d", nets.opt_d)):
        state = opt.state_dict()
        for index, values in state["state"].items():
            for key, value in values.items():
                if not torch.is_tensor(value):
                    raise TypeError(f"{prefix} state '{key}' is a {type(value).__name__}, not a tensor")
                tensors[f"{prefix}.{index}.{key}"] = value
        groups[prefix] = state["param_groups"]
    return _tensor_bytes(tensors, {"param_groups": json.dumps(groups)})


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def rng_state() -> dict:
    """This process's random generators as JSON: what a resumed run needs to draw the same noise."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"python": [py_version, list(py_state), py_gauss],
            "numpy": [np_kind, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
            "torch": _b64(torch.get_rng_state()),
            "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def _b64(state: torch.Tensor) -> str:
    """A generator state (a uint8 tensor) as JSON text."""
    return base64.b64encode(state.numpy().tobytes()).decode()


def parse_rng_state(state: dict) -> tuple:
    """`rng_state`'s JSON as typed values; a ValueError, TypeError or KeyError if it is not that."""
    py_version, py_state, py_gauss = state["python"]
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    as_bytes = lambda text: torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)
    py = (int(py_version), tuple(int(v) for v in py_state), None if py_gauss is None else float(py_gauss))
    numpy = (str(np_kind), np.asarray(np_keys, dtype=np.uint32), int(np_pos), int(np_has_gauss), float(np_gauss))
    return py, numpy, as_bytes(state["torch"]), [as_bytes(s) for s in state["cuda"]]


def set_rng_state(parsed: tuple) -> None:
    """Restore what `parse_rng_state` returned."""
    py, numpy, cpu, cuda = parsed
    random.setstate(py)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():
        for device, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)


def _describe(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


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
    failed = [(rank, e) for rank, e in enumerate(dist.gather_all(accelerator, error)) if e]
    if not failed:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)        # frees what it took, and leaves nothing half-written
    rank, reason = failed[0]
    kept = RunLayout.of(run_dir).latest_checkpoint()
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


def rotate(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints. Never touches the newest one."""
    done = list_complete(run_dir)
    for _, path in done[:-max(1, keep)]:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Loading


class Unreadable(ValueError):
    """A checkpoint file that is missing, altered or not what its name says."""


def read_marker(path: Path) -> Optional[dict]:
    """COMPLETE as written by this format, or None for a checkpoint of the earlier (Accelerate) layout."""
    text = (path / MARKER).read_text()
    if not text.lstrip().startswith("{"):
        return None
    marker = json.loads(text)
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict):
        raise Unreadable(f"{MARKER} is not a {FORMAT} marker")
    return marker


def read_file(path: Path, marker: dict, name: str) -> bytes:
    """The bytes of `name`, only if COMPLETE lists it with this size and sha256."""
    entry = marker["files"].get(name)
    if not isinstance(entry, dict):
        raise Unreadable(f"{name} is not listed in {MARKER}")
    if (path / name).stat().st_size != entry.get("bytes"):       # before reading: a size that does not fit
        raise Unreadable(f"{name} does not match the size and sha256 in {MARKER} (altered or damaged)")
    data = (path / name).read_bytes()
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise Unreadable(f"{name} does not match the size and sha256 in {MARKER} (altered or damaged)")
    return data


def read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint, checked against COMPLETE when it is of this format."""
    from safetensors.torch import load

    marker = read_marker(path)
    return load(read_file(path, marker, name) if marker is not None else (path / name).read_bytes())


def load(accelerator: Accelerator, path: Path, nets: Nets) -> tuple[TrainerState, bool]:
    """Restore models, EMA, optimizers, scaler and this rank's random states from `path`. Returns
    (trainer_state, whether this rank's random states were there). Everything is read and checked
    before anything is changed."""
    marker = read_marker(path)
    parts = _read_current(path, marker, accelerator.process_index) if marker is not None else \
        _read_legacy(path, accelerator.process_index)
    state_text, tensors, optim, scaler, rng = parts
    state = read_state(state_text)
    rng = parse_rng_state(rng) if rng is not None else None
    _apply(nets, tensors, optim)
    if accelerator.scaler is not None and scaler is not None:
        accelerator.scaler.load_state_dict(scaler)    # written without fp16 (bf16, fp32): the scaler starts fresh
    if rng is not None:
        set_rng_state(rng)
    return state, rng is not None


def _read_current(path: Path, marker: dict, rank: int) -> tuple:
    from safetensors.torch import load as load_tensors

    text = lambda name: read_file(path, marker, name).decode()
    state = text(STATE_FILE)
    tensors = load_tensors(read_file(path, marker, NETS))
    optim_bytes = read_file(path, marker, OPTIMIZERS)
    optim = _optimizer_states(load_tensors(optim_bytes), json.loads(_metadata(optim_bytes)["param_groups"]))
    scaler = json.loads(text(SCALER)) if SCALER in marker["files"] else None
    rng = json.loads(text(rng_file(rank))) if rng_file(rank) in marker["files"] else None
    return state, tensors, optim, scaler, rng


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


def _apply(nets: Nets, tensors: dict[str, torch.Tensor], optim: dict[str, dict]) -> None:
    for prefix, module in _modules(nets).items():
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    for opt, saved in ((nets.opt_g, optim["opt_g"]), (nets.opt_d, optim["opt_d"])):
        opt.load_state_dict(saved)
        _match_layouts(opt)


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


def read_state(text: str) -> TrainerState:
    try:
        return TrainerState.from_json(text)
    except ValueError as exc:
        raise Unreadable(f"{STATE_FILE}: {exc}") from None


# The only globals a checkpoint of the earlier layout may name: NumPy's array reconstruction, for its
# saved NumPy random state. weights_only refuses everything else, code above all.
_LEGACY_SAFE_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, codecs.encode,
                        getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]


def _torch_load(path: Path):
    with torch.serialization.safe_globals(_LEGACY_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_legacy(path: Path, rank: int) -> tuple:
    """Accelerate's layout, written by earlier versions: G and D as model(_1).safetensors, the EMA as
    custom_checkpoint_0.pkl, optimizers as optimizer(_1).bin, the scaler as scaler.pt, random states as
    random_states_<rank>.pkl. Every pickle goes through weights_only."""
    from safetensors.torch import load_file

    state = (path / STATE_FILE).read_text()
    tensors = {f"G.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}
    tensors.update({f"D.{k}": v for k, v in load_file(str(path / "model_1.safetensors")).items()})
    tensors.update({f"ema.{k}": v for k, v in _torch_load(path / "custom_checkpoint_0.pkl").items()})
    optim = {"opt_g": _torch_load(path / "optimizer.bin"), "opt_d": _torch_load(path / "optimizer_1.bin")}
    scaler = _torch_load(path / "scaler.pt") if (path / "scaler.pt").is_file() else None
    rng = None
    if (path / f"random_states_{rank}.pkl").is_file():
        saved = _torch_load(path / f"random_states_{rank}.pkl")
        kind, keys, pos, has_gauss, gauss = saved["numpy_random_seed"]
        rng = {"python": list(saved["random_state"]), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
               "torch": _b64(saved["torch_manual_seed"]),
               "cuda": [_b64(s) for s in saved.get("torch_cuda_manual_seed", [])]}
    return state, tensors, optim, scaler, rng


def resume(accelerator: Accelerator, run_dir: str | Path,
           nets: Nets) -> tuple[Optional[Path], Optional[TrainerState], bool]:
    """Load the newest checkpoint that every rank can read: (its path, trainer_state, whether this rank's
    random states were in it), or (None, None, False) for a fresh start.

    Rank 0 lists the checkpoints and every rank tries the same one, by name, in its own view of
    run_dir: on shared storage one machine may not see the newest checkpoint yet. If any rank cannot
    read it, all fall back to the one before together, and rank 0 names it and why. If checkpoints
    exist but none loads, stop rather than silently start over and rotate the user's checkpoints away.
    """
    main = accelerator.is_main_process
    names = dist.broadcast_from_main(accelerator, [p.name for _, p in list_complete(run_dir, warn=main)])
    for name in reversed(names):
        path = checkpoint_root(run_dir) / name
        try:
            state, own_rng = load(accelerator, path, nets)
            error = None
        except Exception as exc:  # noqa: BLE001 - missing, truncated, altered or foreign files
            state, own_rng, error = None, False, _reason(exc)
        errors = dist.gather_all(accelerator, error, startup=True)
        if not any(errors):
            return path, state, own_rng
        if main:
            rank, reason = next((r, e) for r, e in enumerate(errors) if e)
            where = f"rank {rank}: " if accelerator.num_processes > 1 else ""
            print(f"warning: skipping unreadable checkpoint {path} ({where}{reason}); trying the one before",
                  file=sys.stderr, flush=True)
    if names:
        raise UserError(f"no loadable checkpoint in '{checkpoint_root(run_dir)}' (tried "
                        f"{len(names)}); move them away to start over")
    return None, None, False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {Path(exc.filename or '?').name}"
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"
