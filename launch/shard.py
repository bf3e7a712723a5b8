#!/usr/bin/env python
"""Turn CelebA (aligned folder or zip, or any image folder) into webdataset tar shards + manifest.json.

    python launch/shard.py --input /data/celeba --output /data/celeba64 --resolution 64 --split train

--output may also be a bucket or server: s3://bucket/celeba64/, gs://bucket/celeba64/, an http(s) URL that
accepts PUT, or pipe:CMD with {name} (CMD reads the file on stdin). Shards are then written to a local
temporary folder and uploaded one by one as they are done, the manifest last: a set without its
manifest is incomplete, as on disk.
"""
import argparse

from dcgan_dist.data.celeba import SPLITS, open_source
from dcgan_dist.data.shards import IMAGES_PER_BLOCK, Sharding, write_shards
from dcgan_dist.errors import UserError, main_guard
from dcgan_dist.host import usable_cores


@main_guard
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="CelebA folder (or its parent), or a folder of images")
    p.add_argument("--output", required=True, help="folder (or s3://, gs://, http(s)://, pipe: URL) for the "
                                                   ".tar shards and manifest.json")
    p.add_argument("--resolution", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--split", default="train", choices=(*SPLITS, "all"))
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--images-per-block", type=int, default=IMAGES_PER_BLOCK,
                   help=f"images per .npy tar member (default {IMAGES_PER_BLOCK}); the loader reads a block at a time")
    p.add_argument("--workers", type=int, default=usable_cores(),
                   help="parallel encoder processes (default: the cores this process may use)")
    p.add_argument("--max-skip-fraction", type=float, default=0.01,
                   help="fail if more than this fraction of images is unreadable (default 0.01)")
    args = p.parse_args()
    if min(args.shard_size, args.workers, args.images_per_block) < 1:
        raise UserError("--shard-size, --workers and --images-per-block: expected positive integers")
    source = open_source(args.input, args.split)
    manifest = write_shards(source, args.output, Sharding(args.resolution, args.split, args.shard_size,
                                                          args.images_per_block, args.workers, args.max_skip_fraction))
    print(f"wrote {manifest['count']} images in {len(manifest['shards'])} shards to {args.output} "
          f"(skipped {manifest['skipped']['count']}, missing {manifest['missing']['count']})")


if __name__ == "__main__":
    main()
