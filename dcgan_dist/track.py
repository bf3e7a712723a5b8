"""Everything a user watches: metrics.jsonl, the progress bar, sample PNGs and W&B.

Only global rank 0 does any of it; on other ranks every method is a no-op. Nothing here may stop
training: a failing W&B call is reported once and W&B is switched off for the rest of the run.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from tqdm import tqdm

from dcgan_dist.config import Config
from dcgan_dist.fsutil import atomic_write_text
from dcgan_dist.layout import RunLayout, valid_run_id
from dcgan_dist.redact import redact
from dcgan_dist.report import grid_image


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def run_id_for(run_dir: str | Path, fallback: str) -> str:
    """The run_dir's W&B run id (rank 0), or `fallback` (the checkpoint's id, else a new one) written
    there. Kept in run_dir from the first start, so a job killed before its first checkpoint still logs
    to the same run when rerun. Older run folders have it only in their checkpoints; it is written out
    on their next start."""
    path = RunLayout.of(run_dir).wandb_id
    kept = None
    if path.is_file():
        kept = path.read_text().strip()
        if not valid_run_id(kept):
            _warn(f"{path} holds no W&B run id (expected up to 64 letters and digits); writing a new one")
            kept = None
    run_id = kept or fallback
    if run_id != kept:
        atomic_write_text(path, run_id + "\n")
    return run_id


def start_wandb(accelerator: Accelerator, cfg: Config, run_id: str, config_dict: dict) -> Optional[str]:
    """Start the W&B run on rank 0 through Accelerate's tracker. Returns the mode it ended up in."""
    if cfg.wandb.mode == "disabled" or not accelerator.is_main_process:
        return None
    mode = cfg.wandb.mode
    if mode == "online" and not has_wandb_credentials():
        _warn("wandb.mode=online but no W&B API key (WANDB_API_KEY or ~/.netrc); logging offline to "
              f"{cfg.run_dir}/wandb instead; upload later with `wandb sync`")
        mode = "offline"
    for attempt in (mode, "offline") if mode == "online" else (mode,):
        import wandb

        kwargs = dict(mode=attempt, dir=str(Path(cfg.run_dir).resolve()), id=run_id, resume="allow",
                      entity=cfg.wandb.entity, name=cfg.wandb.name or Path(cfg.run_dir).name,
                      # Never prompt, never wait long for a network that is not there.
                      settings=wandb.Settings(init_timeout=60, console="off", silent=True))
        # W&B stores the command line (sys.argv) in the run's metadata; a data.shards=... there may hold
        # a credential, so it is shown the redacted one while the run starts.
        argv, sys.argv = sys.argv, [redact(a) for a in sys.argv]
        try:
            accelerator.init_trackers(cfg.wandb.project, config=config_dict, init_kwargs={"wandb": kwargs})
            return attempt
        except Exception as exc:  # noqa: BLE001 - any W&B failure must not stop training
            accelerator.trackers = []
            _warn(f"W&B {attempt} start failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        finally:
            sys.argv = argv
    _warn("continuing without W&B; metrics.jsonl and samples/ still record the run")
    return None


def _truncate_after(path: Path, step: int) -> None:
    """Drop metric lines past `step`: a run killed after its last checkpoint logged steps that the
    resumed run will log again (with the same values), and each step should appear once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if ln.strip() and _step_of(ln) <= step]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(keep))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62            # a line torn by a kill mid-write: drop it


class Tracker:
    """Rank-0 sink for scalars and images. `enabled=False` on other ranks."""

    def __init__(self, accelerator: Accelerator, cfg: Config, start_step: int, wandb_mode: Optional[str]):
        self.acc = accelerator
        self.enabled = accelerator.is_main_process
        self.use_wandb = self.enabled and wandb_mode is not None
        self.layout = RunLayout.of(cfg.run_dir)
        self.samples_dir = self.layout.samples
        self.bar = None
        if self.enabled:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            metrics_path = self.layout.metrics
            _truncate_after(metrics_path, start_step)
            # Append: a resumed run continues the same file.
            self.metrics = open(metrics_path, "a", buffering=1)
            self.bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc="training", smoothing=0.05, mininterval=1.0)
        self.t0 = time.time()

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"\ndcgan-dist: {message}", file=sys.stderr, flush=True)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def scalars(self, step: int, values: dict, section: str = "train") -> None:
        """One metrics.jsonl row and one W&B log. A training row (section "train") has the loss keys;
        any other section's row (an evaluation: section "eval", {"fid": ...}) is stored with its keys
        prefixed ("eval/fid"), beside "kimg", and can hold any keys at all."""
        if not self.enabled:
            return
        rounded = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in values.items()}
        if section != "train":
            rounded = {(k if k == "kimg" else f"{section}/{k}"): v for k, v in rounded.items()}
        row = {"step": step, **rounded, "time": round(time.time() - self.t0, 3)}
        self.metrics.write(json.dumps(row) + "\n")
        if section == "train":
            self.bar.set_postfix(kimg=f"{values['kimg']:.1f}", img_s=f"{values['images_per_s']:.0f}",
                                 loss_d=f"{values['loss_d']:.3f}", loss_g=f"{values['loss_g']:.3f}", refresh=False)
        else:
            self.note(f"{section} at step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in values.items()
                                                                if isinstance(v, float)))
        logged = {(k if "/" in k else f"{section}/{k}"): v for k, v in
                  (values.items() if section == "train" else rounded.items())}
        self._wandb(lambda: self.acc.log(logged, step=step))

    def images(self, step: int, name: str, images: torch.Tensor, path: Path) -> Optional[Path]:
        """Save a grid of images in [-1, 1] to `path` (one of self.layout's) and send it to W&B."""
        if not self.enabled:
            return None
        grid = grid_image(images, nrow=int(math.sqrt(len(images)) + 0.5))
        tmp = path.with_name(f".{path.name}.tmp.png")
        grid.save(tmp, format="PNG")
        os.replace(tmp, path)
        if self.use_wandb:
            import wandb

            self._wandb(lambda: self.acc.get_tracker("wandb", unwrap=True).log(
                {name: wandb.Image(str(path), caption=f"step {step}")}, step=step))
        return path

    def report(self, pictures: dict[str, Path]) -> None:
        """The end-of-run pictures, to W&B under report/<name>."""
        if not (self.use_wandb and pictures):
            return
        import wandb

        def media(path: Path):
            return wandb.Video(str(path), format="gif") if path.suffix == ".gif" else wandb.Image(str(path))

        self._wandb(lambda: self.acc.get_tracker("wandb", unwrap=True).log(
            {f"report/{name}": media(path) for name, path in pictures.items()}))

    def _wandb(self, call) -> None:
        if not self.use_wandb:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001
            self.use_wandb = False
            _warn(f"W&B logging failed ({type(exc).__name__}: {exc}); continuing without W&B")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            self.metrics.close()
