#!/usr/bin/env python
"""Loader throughput: images/s up to the normalised float batch the training step consumes.

    python benchmarks/data_throughput.py --shards data/shards/demo64 --batch-size 128 [--num-workers N] \
        --batches 50 [--jpeg-root data/synthetic/celeba/img_align_celeba] [--device cpu|cuda] [--http]

--shards may be a URL (http(s)://, s3://, gs://, pipe:): the stream then reads it remotely. With --http
and a folder, the folder is also served by a local HTTP server (`python -m http.server`, its own
process) and read through it: remote against local disk, the same set.

--num-workers defaults to what the trainer uses on that device (`data.num_workers: null`): 0 on CPU,
up to 4 on a GPU. On CUDA the batches come through pinned memory, as in training.

Ours: the real per-rank stream (tar shards -> uint8 batch) plus the on-device normalisation the loop
does. With --jpeg-root, also the seeds' pipeline on the source JPEGs: ImageFolder-style reading +
Resize(R) + CenterCrop(R) + ToTensor + Normalize, batched by a DataLoader. Prints a table; the last
line is JSON with `images_per_s` (ours) and, when measured, the seeds' figure and the ratio.
"""
import argparse
import contextlib
import itertools
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcgan_dist.config import load_config  # noqa: E402
from dcgan_dist.data import stream  # noqa: E402
from dcgan_dist.data.shards import ShardSet, read_manifest  # noqa: E402


def time_ours(shards: str, batch: int, workers: int, batches: int, device: torch.device) -> float:
    cfg = load_config(None, [f"data.batch_size={batch}", "data.shuffle_buffer=2000"])
    it = stream.batches(ShardSet.open(shards), cfg, stream.Placement(0, 1, workers))
    try:
        for _ in range(3):                               # warm-up: workers start, shuffle buffer fills
            next(it)
        t0 = time.perf_counter()
        for images, _ in itertools.islice(it, batches):
            x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        assert x.shape[0] == batch
        return batches * batch / seconds
    finally:    # an exception's traceback would keep the workers, which ignore SIGTERM, alive at exit
        it.close()


def time_seeds(jpeg_root: Path, resolution: int, batch: int, workers: int, batches: int) -> float:
    from PIL import Image
    from torchvision import transforms

    files = sorted(p for p in jpeg_root.rglob("*.jpg"))
    tf = transforms.Compose([transforms.Resize(resolution), transforms.CenterCrop(resolution),
                             transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])

    class Folder(torch.utils.data.Dataset):          # what ImageFolder does per item: open, RGB, transform
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return tf(Image.open(files[i]).convert("RGB")), 0

    loader = torch.utils.data.DataLoader(Folder(), batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True)
    n = min(batches, len(files) // batch)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for x, _ in itertools.islice(it, n - 1):
        pass
    return (n - 1) * batch / (time.perf_counter() - t0)


@contextlib.contextmanager
def http_server(folder: Path):
    """`python -m http.server` serving `folder` on a free loopback port; yields the set's URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                               str(folder), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "manifest.json", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="a shard folder or URL")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, help="loader workers (default: the trainer's default here)")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--jpeg-root", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--http", action="store_true", help="also read the folder through a local HTTP server")
    args = p.parse_args()
    torch.set_num_threads(1)                             # the target is per core
    device = torch.device(args.device)
    if args.num_workers is None:
        from dcgan_dist.dist.setup import loader_workers

        args.num_workers = loader_workers(None, device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    resolution = read_manifest(args.shards)["resolution"]
    ours = time_ours(args.shards, args.batch_size, args.num_workers, args.batches, device)
    result = {"images_per_s": round(ours, 1), "batch_size": args.batch_size, "num_workers": args.num_workers,
              "resolution": resolution}
    print(f"{'pipeline':<40} {'img/s':>10}")
    print(f"{'dcgan-dist stream (tar -> float batch)':<40} {ours:>10.0f}")
    if args.http:
        with http_server(Path(args.shards)) as url:
            served = time_ours(url, args.batch_size, args.num_workers, args.batches, device)
        print(f"{'the same, from ' + url:<40} {served:>10.0f}")
        result.update(http_images_per_s=round(served, 1), http_over_local=round(served / ours, 2))
    if args.jpeg_root:
        seeds = time_seeds(args.jpeg_root, resolution, args.batch_size, args.num_workers, args.batches)
        print(f"{'seeds: ImageFolder+Resize+CenterCrop':<40} {seeds:>10.0f}")
        print(f"{'ratio':<40} {ours / seeds:>10.1f}x")
        result.update(seeds_images_per_s=round(seeds, 1), ratio=round(ours / seeds, 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
