#!/usr/bin/env python
"""Upload a run_dir's offline W&B run: every start's segment, in order, as the one run.

    python launch/wandb_sync.py runs/demo              # needs WANDB_API_KEY or `wandb login`
    python launch/wandb_sync.py runs/demo --dry-run    # print the plan and the wandb command only

Each restart of an offline run is its own run_dir/wandb/offline-run-* folder, all with the run_dir's
one run id. A restart logs again the steps after its checkpoint; the earlier segment's copies of those
rows are left out (a trimmed copy of its run file goes to run_dir/wandb/sync/), so each step is
uploaded once. Segments uploaded before are listed in run_dir/wandb/synced.json and skipped.
"""
import argparse
import sys
from pathlib import Path

from dcgan_dist.errors import main_guard


@main_guard
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--dry-run", action="store_true", help="print the plan and the command, upload nothing")
    p.add_argument("--all", action="store_true", help="upload segments again that were uploaded before")
    p.add_argument("--project", help="upload to this W&B project (default: the one the run was logged to)")
    p.add_argument("--entity", help="upload to this W&B team or user (default: the run's, else your default)")
    p.add_argument("--wandb", help="the wandb command (default: wandb on PATH, else beside this Python)")
    args = p.parse_args()

    from dcgan_dist.report.wandb_sync import sync

    sys.exit(sync(args))


if __name__ == "__main__":
    main()
