"""What a checkpoint knows about the run beyond the tensors: `trainer_state.json`, typed and versioned.
Every field has one meaning and one unit. Reading checks every field's type, since the file comes from a
run folder that may have been edited or damaged. The Trainer owns the one instance of a run."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from dcgan_dist.run.layout import valid_run_id

SCHEMA = 2


@dataclass
class TrainerState:
    step: int = 0                            # optimizer steps done (one D and one G update each)
    images_seen: int = 0                     # real images, all ranks together
    global_batch: Optional[int] = None       # images per step when it was saved; None before the first save
    world_size: Optional[int] = None
    mixed_precision: Optional[str] = None
    wandb_run_id: Optional[str] = None
    skipped_d: int = 0                       # updates skipped (fp16 overflow, train.nonfinite=skip), all run
    skipped_g: int = 0
    data_errors: int = 0                     # unreadable blocks and shards left out, all ranks, all run
    excluded_shards: list[str] = field(default_factory=list)    # names, each counted once in data_errors
    last_eval: dict[str, float] = field(default_factory=dict)   # the newest evaluation's metrics
    best: Optional[dict[str, Any]] = None    # {"metric", "value", "step", "metrics"}, by eval.best_by
    schema: int = SCHEMA

    @property
    def kimg(self) -> float:
        return self.images_seen / 1000

    def to_json(self) -> str:
        # kimg is derived, but written too: people look for it.
        return json.dumps({**dataclasses.asdict(self), "kimg": self.kimg}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        """The state in `text`; a ValueError saying what is wrong otherwise."""
        try:
            raw = json.loads(text)
        except ValueError:
            raise ValueError("not JSON") from None
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if raw.get("schema") != SCHEMA:
            raise ValueError(f"schema {raw.get('schema')!r}, which this version does not read (it reads {SCHEMA})")
        known = {f.name for f in dataclasses.fields(cls)}
        s = cls(**{k: v for k, v in raw.items() if k in known})
        count = lambda v, low=0: isinstance(v, int) and not isinstance(v, bool) and v >= low
        problems = [f"'{n}' is not a count ({getattr(s, n)!r})" for n in ("step", "images_seen", "skipped_d",
                                                                           "skipped_g", "data_errors")
                    if not count(getattr(s, n))]
        problems += [f"'{n}' is not a positive count ({getattr(s, n)!r})" for n in ("global_batch", "world_size")
                     if getattr(s, n) is not None and not count(getattr(s, n), 1)]
        checks = {"a W&B run id that is not a short alphanumeric string": s.wandb_run_id is None or
                  valid_run_id(s.wandb_run_id),
                  "'excluded_shards' is not a list of names": isinstance(s.excluded_shards, list) and
                  all(isinstance(x, str) for x in s.excluded_shards),
                  "'last_eval' is not a mapping": isinstance(s.last_eval, dict),
                  "'best' lacks its metric, value or step": s.best is None or
                  isinstance(s.best, dict) and {"metric", "value", "step"} <= set(s.best),
                  "'mixed_precision' is not a name": s.mixed_precision is None or isinstance(s.mixed_precision, str)}
        problems += [what for what, ok in checks.items() if not ok]
        if problems:
            raise ValueError(problems[0])
        return s
