#!/usr/bin/env python
"""Train the attribute classifier that face arithmetic (launch/generate.py --arithmetic) scores with.

    python launch/attributes.py --shards data/shards/demo64 [--output FILE] [--epochs 8]

It learns CelebA's 40 attributes from the shards' own labels (list_attr_celeba.txt), holding out every
10th image, and prints the held-out accuracy per attribute. By default the file is cached next to the
shards (SHARDS/attributes.safetensors), where generate.py looks for it.
"""
import argparse
from pathlib import Path

from dcgan_dist.errors import UserError, main_guard


@main_guard
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="a shard set made by launch/shard.py from CelebA's layout")
    p.add_argument("--output", help="where to write it (default SHARDS/attributes.safetensors)")
    p.add_argument("--epochs", type=int, default=8)
    args = p.parse_args()
    if args.epochs < 1:
        raise UserError(f"--epochs: expected a positive count, got {args.epochs}")

    from dcgan_dist.data.shards import ShardSet
    from dcgan_dist.eval.attributes import CACHE_NAME, save_classifier, train_classifier

    shard_set = ShardSet.open(args.shards)
    net, report = train_classifier(shard_set, epochs=args.epochs)
    output = Path(args.output) if args.output else Path(args.shards) / CACHE_NAME
    save_classifier(output, net, shard_set, report)
    print(f"held-out images: {report['held_out_images']}")
    print(f"{'attribute':<22} {'accuracy':>8} {'balanced':>8} {'positives':>9}")
    for name, r in report["attributes"].items():
        print(f"{name:<22} {r['accuracy']:8.3f} {r['balanced_accuracy']:8.3f} {r['positive_rate']:9.3f}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
