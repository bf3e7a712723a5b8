#!/usr/bin/env python
"""Images from a trained generator: a grid, a folder of PNGs, latent interpolations, face arithmetic.

    python launch/generate.py --checkpoint runs/demo --num 64 --output grid.png
    python launch/generate.py --checkpoint runs/demo --num 5000 --output samples/      # one PNG each
    python launch/generate.py --checkpoint runs/demo --interpolate 6 --output walk.png  # + walk.gif
    python launch/generate.py --checkpoint runs/demo --output smile.png \\
        --arithmetic "Smiling,~Male - ~Smiling,~Male + ~Smiling,Male"

--checkpoint: a run dir (its best snapshot, else the latest), a checkpoint dir, a generator.safetensors,
a downloaded artifact folder, or a W&B model artifact: wandb:ENTITY/PROJECT/generator-RUNID:best (needs a key).
The same --seed gives the same images on the same device; bf16 is used where the hardware runs it.
"""
import argparse
import sys

from dcgan_dist.errors import UserError, main_guard


@main_guard
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run dir, checkpoint dir, generator.safetensors or wandb:ENTITY/PROJECT/NAME:ALIAS")
    p.add_argument("--output", required=True, help="OUT.png for a grid or figure; a folder for one PNG per image")
    p.add_argument("--num", type=int, default=64, help="images (grid or folder; default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--batch", type=int, default=64, help="latents per forward pass (default 64)")
    p.add_argument("--interpolate", type=int, metavar="K", help="K latent paths, as a PNG of strips and a GIF")
    p.add_argument("--steps", type=int, default=10, help="images per interpolation path (default 10)")
    p.add_argument("--arithmetic", metavar="EXPR", help='e.g. "Smiling,~Male - ~Smiling,~Male + ~Smiling,Male"')
    p.add_argument("--attributes", help="attribute classifier file (default: the one cached next to the "
                                        "run's shards, trained there on first use)")
    args = p.parse_args()
    for flag in ("num", "batch", "steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag}: expected a positive count, got {getattr(args, flag)}")
    if args.interpolate is not None and args.interpolate < 1:
        raise UserError(f"--interpolate: expected a positive count of paths, got {args.interpolate}")

    from dcgan_dist.eval import generate  # after the flags: a typo fails before torch loads

    out = generate.run(args)
    print(out, file=sys.stderr)


if __name__ == "__main__":
    main()
