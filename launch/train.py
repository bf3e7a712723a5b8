#!/usr/bin/env python
"""Train DCGAN data-parallel with Accelerate.

    accelerate launch [--num_processes N --mixed_precision bf16] launch/train.py \\
        --config configs/celeba64.yaml [dotted.key=value ...]

Restarting the same command resumes from the latest complete checkpoint in run_dir.
"""
import argparse

from dcgan_dist.config import load_config, reference
from dcgan_dist.errors import main_guard


@main_guard
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, epilog="config keys (docs/CONFIG.md):\n" + reference(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)

    from dcgan_dist.train.trainer import train  # after validation: a typo fails before torch loads

    train(cfg)


if __name__ == "__main__":
    main()
