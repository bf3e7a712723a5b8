"""Where everything in a run folder lives, in one place:

    run_dir/
      config.yaml          the resolved config, schema keys only: `--config run_dir/config.yaml` reloads it
      run.json             facts about the run: world size, precision, global batch, workers, dataset size
      metrics.jsonl        one JSON row per log step (training) and per evaluation ("eval/..." keys)
      checkpoints/step-XXXXXXXX/   full training state (checkpoint.py); checkpoints/best/ by eval.best_by
      samples/             reals.png, fakes-XXXXXXXX.png (EMA G), raw-XXXXXXXX.png (raw G), report pictures
      wandb/               the W&B run (offline runs are synced from here)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> "RunLayout":
        return cls(Path(run_dir))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def facts(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def fakes(self, step: int, raw: bool = False) -> Path:
        return self.samples / f"{'raw' if raw else 'fakes'}-{step:08d}.png"

    @property
    def reals(self) -> Path:
        return self.samples / "reals.png"
