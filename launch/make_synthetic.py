#!/usr/bin/env python
"""Draw N procedural face-like images in CelebA's aligned layout under OUTPUT/celeba/.

    python launch/make_synthetic.py --output data/synthetic --num 4000 [--seed 0] [--style studio|street]
"""
import argparse

from dcgan_dist.data.synthetic import STYLES, write_celeba
from dcgan_dist.errors import UserError, main_guard


@main_guard
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="parent folder; images go to OUTPUT/celeba/")
    p.add_argument("--num", type=int, default=4000, help="number of images (default 4000)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--style", choices=STYLES, default="studio",
                   help="studio: plain gradient backdrops (the demo's); street: cluttered ones, a harder set")
    args = p.parse_args()
    if args.num < 1:
        raise UserError(f"--num: expected a positive count, got {args.num}")
    root = write_celeba(args.output, args.num, args.seed, style=args.style)
    print(f"wrote {args.num} images in CelebA layout to {root}")


if __name__ == "__main__":
    main()
