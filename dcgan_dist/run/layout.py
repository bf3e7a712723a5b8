"""Where everything in a run folder lives, in one place:

    run_dir/
      config.yaml          the resolved config, schema keys only: `--config run_dir/config.yaml` reloads it
      run.json             facts about the run: world size, precision, global batch, workers, dataset size,
                           CPU layers with forward-form weight gradients
      wandb-run-id         the W&B run id, from the first start: every restart logs to that run
      LOCK                 while a job runs: which host and process hold this run_dir (run/lock.py)
      metrics.jsonl        one JSON row per log step (training) and per evaluation ("eval/..." keys)
      checkpoints/step-XXXXXXXX/   full training state (run/checkpoint.py), and generator.safetensors,
                           the EMA generator alone (run/snapshot.py); checkpoints/best/ likewise, by eval.best_by
      generator.safetensors   a copy of the best snapshot (of the latest while there is no best)
      samples/             reals.png, fakes-XXXXXXXX.png (EMA G), raw-XXXXXXXX.png (raw G), report pictures
      wandb/               the W&B run: offline-run-*/ (one per start, uploaded as one run by
                           launch/wandb_sync.py), data/ (artifact files staged for that upload)
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from dcgan_dist.errors import warn

MARKER = "COMPLETE"                       # written last: a checkpoint folder without it is incomplete
STATE_FILE = "trainer_state.json"
_STEP_NAME = re.compile(r"^step-(\d{8})$")


class RunLayout:
    """The paths of one run folder (the list above)."""

    def __init__(self, run_dir: str | Path):
        root = self.root = Path(run_dir)
        self.config, self.facts, self.wandb_id, self.lock = (root / "config.yaml", root / "run.json",
                                                             root / "wandb-run-id", root / "LOCK")
        self.metrics, self.generator = root / "metrics.jsonl", root / "generator.safetensors"
        self.samples, self.wandb = root / "samples", root / "wandb"
        self.checkpoints = root / "checkpoints"
        self.best, self.reals = self.checkpoints / "best", self.samples / "reals.png"

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    def fakes(self, step: int, raw: bool = False) -> Path:
        return self.samples / f"{'raw' if raw else 'fakes'}-{step:08d}.png"

    def complete_checkpoints(self, warn_incomplete: bool = False) -> list[tuple[int, Path]]:
        """(step, path) of every complete step checkpoint, oldest first; incomplete ones are skipped."""
        found = []
        for path in sorted(self.checkpoints.glob("step-*")) if self.checkpoints.is_dir() else []:
            m = _STEP_NAME.match(path.name)
            if not m:
                continue
            if not (path / MARKER).is_file() or not (path / STATE_FILE).is_file():
                if warn_incomplete:
                    warn(f"skipping incomplete checkpoint {path}")
                continue
            found.append((int(m.group(1)), path))
        return found

    def latest_checkpoint(self) -> Optional[Path]:
        done = self.complete_checkpoints()
        return done[-1][1] if done else None


def valid_run_id(value) -> bool:
    """A W&B run id as dcgan-dist writes them: up to 64 letters and digits (it names folders and URLs)."""
    return isinstance(value, str) and value.isalnum() and 0 < len(value) <= 64
