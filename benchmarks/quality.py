#!/usr/bin/env python
"""Quality benchmark: FID, KID, SWD, precision and recall after a fixed training budget, per remedy or loss, against the
pytorch/examples control and the real-vs-real floor.

    python benchmarks/quality.py --shards data/shards/demo64 --out runs/quality \
        --variants paper,diffaugment,ttur,label_smoothing,instance_noise,lsgan,hinge \
        [--peer-main /path/to/pytorch/examples/dcgan/main.py] [--steps 900] [--num-images 500]

Each variant is a real `accelerate launch` of launch/train.py with configs/demo.yaml (2 CPU ranks) plus
its overrides. Afterwards every generator is scored the same way, in this process, on the same real
images (the shards' first N) and the same latents: the untrained G, each variant's raw G and its EMA,
and the control's G (its own weights, loaded into our Generator: the two nets are the same layers).
The real-vs-real floor compares the first N images with the next N. Results go to OUT/quality.json
(merged with earlier runs, so variants can be run a few at a time) and a Markdown table is printed.
"""
import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dcgan_dist.config import load_config  # noqa: E402
from dcgan_dist.data.shards import ShardSet, read_manifest  # noqa: E402
from dcgan_dist.data.stream import image_batches  # noqa: E402
from dcgan_dist.dist.setup import build_eval_accelerator  # noqa: E402
from dcgan_dist.eval.evaluate import Evaluation, Protocol  # noqa: E402
from dcgan_dist.nets import metrics  # noqa: E402
from dcgan_dist.nets.models import build_models  # noqa: E402
from dcgan_dist.run.checkpoint import NETS, read_file, read_marker  # noqa: E402
from dcgan_dist.run.layout import RunLayout  # noqa: E402

VARIANTS = {
    "paper": [],
    "diffaugment": ["gan.diffaugment=color,translation,cutout"],
    "ttur": ["optim.ttur_lr_d=5e-5"],
    "label_smoothing": ["gan.label_smoothing=0.1"],
    "instance_noise": ["gan.instance_noise=0.2", "gan.instance_noise_kimg=115.2"],
    "da+ls": ["gan.diffaugment=color,translation,cutout", "gan.label_smoothing=0.1"],
    "da+ema2": ["gan.diffaugment=color,translation,cutout", "train.ema_halflife_kimg=2"],
    "lsgan": ["gan.loss=lsgan"],
    "hinge": ["gan.loss=hinge"],
    "da+ema2+lsgan": ["gan.diffaugment=color,translation,cutout", "train.ema_halflife_kimg=2", "gan.loss=lsgan"],
    "da+ema2+hinge": ["gan.diffaugment=color,translation,cutout", "train.ema_halflife_kimg=2", "gan.loss=hinge"],
}


def train(name: str, overrides: list[str], args) -> Path:
    run_dir = args.out / Path(args.shards).name / name      # per shard set: never score another set's G
    if (run_dir / "checkpoints" / f"step-{args.steps:08d}" / "COMPLETE").is_file():
        return run_dir                                      # trained by an earlier invocation
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc.yaml"), str(ROOT / "launch/train.py"),
           "--config", str(args.config), f"run_dir={run_dir}", f"data.shards={args.shards}",
           f"train.steps={args.steps}", "eval.metrics=", "wandb.mode=disabled", "train.keep_ckpts=1",
           *args.base_overrides, *overrides]
    print(f"[{time.strftime('%H:%M:%S')}] training {name}: {' '.join(overrides) or '(the paper)'}", flush=True)
    started = time.time()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=open(run_dir.parent / f"{name}.log", "w"))
    (run_dir / "train_seconds.txt").write_text(f"{time.time() - started:.1f}\n")
    return run_dir


def load_generators(run_dir: Path, steps: int) -> dict[str, torch.nn.Module]:
    cfg = load_config(run_dir / "config.yaml")
    from safetensors.torch import load

    ckpt = RunLayout(run_dir).step_dir(steps)
    tensors = load(read_file(ckpt, read_marker(ckpt), NETS))
    out = {}
    for kind, prefix in (("raw", "G."), ("ema", "ema.")):
        G, _ = build_models(cfg.model.nz, cfg.model.ngf, cfg.model.ndf, cfg.model.resolution)
        G.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        out[kind] = G
    return out


def run_peer(args, reals_dir: Path) -> Path:
    """The control, as it is: its own script, its own data pipeline (a folder of our 64 px train images),
    fp32, the same global batch and the same number of images seen."""
    out = args.out / Path(args.shards).name / "peer"
    epochs = math.ceil(args.steps * 128 / args.count)
    last = out / f"netG_epoch_{epochs - 1}.pth"
    if last.is_file():
        return last
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(args.peer_main), "--dataset", "folder", "--dataroot", str(reals_dir),
           "--workers", "1", "--batchSize", "128", "--imageSize", "64", "--ngf", "32", "--ndf", "32",
           "--niter", str(epochs), "--outf", str(out), "--manualSeed", "0"]
    print(f"[{time.strftime('%H:%M:%S')}] training the pytorch/examples control: {epochs} epochs", flush=True)
    started = time.time()
    subprocess.run(cmd, check=True, stdout=open(args.out / "peer.log", "w"), stderr=subprocess.STDOUT, cwd=out)
    (out / "train_seconds.txt").write_text(f"{time.time() - started:.1f}\n")
    return last


class Replay(torch.nn.Module):
    """A "generator" that hands out the given images in order, batch by batch: the real-vs-real floor,
    scored as every generator is."""

    def __init__(self, images_u8: torch.Tensor, nz: int = 100):
        super().__init__()
        self.images, self.nz, self.at = images_u8.float() / 127.5 - 1, nz, 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out, self.at = self.images[self.at:self.at + len(z)], self.at + len(z)
        return out


def export_reals(shards: str, count: int, folder: Path) -> Path:
    """Every train image as a PNG under folder/all/, the layout torchvision's ImageFolder reads."""
    target = folder / "all"
    if target.is_dir() and len(list(target.iterdir())) == count:
        return folder
    target.mkdir(parents=True, exist_ok=True)
    images = torch.cat([x for _, x in image_batches(ShardSet.open(shards), count, 256)])
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(target / f"{i:06d}.png")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="data/shards/demo64")
    p.add_argument("--config", type=Path, default=ROOT / "configs/demo.yaml",
                   help="base config (its remedies are switched off; each variant adds its own)")
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=900, help="training steps per variant (global batch 128)")
    p.add_argument("--num-images", type=int, default=500, help="images per evaluation (FID depends on it)")
    p.add_argument("--peer-main", type=Path, help="pytorch/examples dcgan/main.py: runs the control")
    p.add_argument("--no-train", action="store_true", help="only score runs already in --out")
    args = p.parse_args()
    args.out = args.out.resolve()                 # the control runs in its own working directory
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(Path(args.shards))
    args.count = manifest["count"]
    # The variants start from the paper's recipe: the base config's own remedies are switched off.
    args.base_overrides = ["gan.diffaugment=", "gan.label_smoothing=0", "gan.instance_noise=0", "optim.ttur_lr_d=null"]
    names = [v for v in args.variants.split(",") if v]
    for name in names:
        if name not in VARIANTS:
            sys.exit(f"error: --variants: unknown variant '{name}' (known: {', '.join(VARIANTS)})")

    n = args.num_images
    shard_set = ShardSet.open(args.shards)
    inception = metrics.load_inception(None, torch.device("cpu"))
    # The trainer's protocol (launch/evaluate.py's too): the shards' first n images, n fakes in batches of 50.
    evaluation = Evaluation(build_eval_accelerator(), shard_set, Protocol(("fid", "kid", "swd", "pr"), n, n, False, 50,
                                                                          0, n), inception, args.out)

    results_path = args.out / "quality.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    key = f"{Path(args.shards).name}/{args.steps}"
    table = results.setdefault(key, {})

    def score(label: str, G: torch.nn.Module, extra: dict) -> None:
        values = evaluation.score(G)
        table[label] = {**{k: round(v, 5) for k, v in values.items()}, **extra}
        results_path.write_text(json.dumps(results, indent=1))
        print(f"  {label:28s} " + " ".join(f"{k}={v:.4g}" for k, v in values.items() if "px" not in k), flush=True)

    if "real vs real (floor)" not in table:
        score("real vs real (floor)", Replay(torch.cat([x for _, x in image_batches(shard_set, 2 * n, n)])[n:]), {})
    if "untrained G" not in table:
        torch.manual_seed(0)                          # the trainer's init for seed 0, every time
        G, _ = build_models(100, 32, 32, manifest["resolution"])
        score("untrained G", G, {})
    for name in names:
        run_dir = args.out / Path(args.shards).name / name if args.no_train else train(name, VARIANTS[name], args)
        seconds = float((run_dir / "train_seconds.txt").read_text()) if (run_dir / "train_seconds.txt").is_file() else None
        for kind, G in load_generators(run_dir, args.steps).items():
            score(f"{name} ({kind} G)", G, {"overrides": VARIANTS[name], "train_seconds": seconds})
    if args.peer_main:
        last = run_peer(args, export_reals(args.shards, args.count, args.out / Path(args.shards).name / "peer_data"))
        G, _ = build_models(100, 32, 32, manifest["resolution"])
        G.load_state_dict(torch.load(last, map_location="cpu", weights_only=True))
        seconds = float((last.parent / "train_seconds.txt").read_text())
        score("pytorch/examples control", G, {"train_seconds": seconds})

    print(f"\n{key}, {n} images per evaluation; lower is better, but precision and recall\n")
    print("| generator | FID | KID | SWD x1e3 | precision | recall |\n| --- | --- | --- | --- | --- | --- |")
    for label, row in table.items():
        cells = [f"{row[k]:.4g}" if k in row else "n/a" for k in ("fid", "kid", "swd", "precision", "recall")]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
