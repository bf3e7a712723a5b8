"""Write webdataset tar shards + manifest.json from a CelebA layout or an image folder.

Images are stored in blocks: one block is two tar members, `000001.npy` (uint8, N x R x R x 3, the
cropped and resized images, RGB, NHWC) and `000001.json` (a list of N records: key, 40 attributes,
identity, split and source file), keyed by the block's first image. Blocks, not one member per image,
because the loader is then a file read and a memcpy per 256 images instead of a tar header, a JPEG
decode and a shuffle-buffer step per image (20x the per-image rate; docs/PERFORMANCE.md). Raw pixels
also make the stored images exactly the crop below, with no second lossy step. `tar` and `webdataset`
read the shards as they are: webdataset's default decoder turns `.npy` into an array.

    crop   the centred square of side min(w, h): for CelebA's 178x218 that is rows 20..197, the
           same region as torchvision's Resize(R) + CenterCrop(R) used by the DCGAN tutorials;
    resize Lanczos (antialiased) to R x R.

Shards are byte-identical for the same input: members are sorted, and every tar header field that
could vary (mtime, owner, mode) is fixed. Shards and the manifest are written atomically; the
manifest comes last, so its presence means the set is complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import tarfile
import tempfile
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from dcgan_dist.data import remote
from dcgan_dist.data.celeba import ATTRIBUTE_NAMES, Source, read_bytes
from dcgan_dist.errors import UserError
from dcgan_dist.fsutil import atomic_write_bytes, atomic_write_text, fsync_dir, probe_writable

MANIFEST = "manifest.json"
FORMAT = "dcgan-dist-shards/2"
OLD_FORMATS = ("dcgan-dist-shards/1",)
IMAGES_PER_BLOCK = 256
CROP_DOC = "centre square of side min(w, h), Lanczos resize to resolution x resolution"


def crop_resize(data: bytes, resolution: int) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (2 * resolution, 2 * resolution))  # JPEG: DCT-downscale only while >= 2x the target
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS,
                      box=(left, top, left + side, top + side))


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _write_shard(task: tuple) -> dict:
    """Worker: crop and resize one shard's images into `<name>.tar`. Returns its manifest entry."""
    out_dir, name, items, zip_path, resolution, images_per_block = task
    pixels, metas, skipped = [], [], []
    for item in items:
        try:
            pixels.append(np.asarray(crop_resize(read_bytes(zip_path, item.ref), resolution)))
        except Exception as exc:  # corrupt, truncated, zero-byte or not an image at all
            skipped.append(f"{item.meta.get('file', item.ref)}: {type(exc).__name__}")
            continue
        metas.append({"key": item.key, **item.meta})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(0, len(pixels), images_per_block):
            key = metas[i]["key"]
            block = np.stack(pixels[i:i + images_per_block])
            _tar_member(tar, f"{key}.npy", _npy_bytes(block))
            _tar_member(tar, f"{key}.json", json.dumps(metas[i:i + images_per_block], sort_keys=True).encode())
    data = buf.getvalue()
    atomic_write_bytes(Path(out_dir) / name, data)
    return {"name": name, "count": len(pixels), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "skipped": skipped}


def write_shards(source: Source, output: Path, resolution: int, split: str, shard_size: int = 1000,
                 workers: int = 1, max_skip_fraction: float = 0.01, progress: bool = True,
                 images_per_block: int = IMAGES_PER_BLOCK, on_shard: Optional[Callable[[Path], None]] = None) -> dict:
    """`on_shard(path)` is called in this process as each shard is complete on disk (to upload it)."""
    output = Path(output)
    _check_writable(output)
    items = source.items
    if not items:
        raise UserError(f"input '{source.root}': no images found for split '{split}'")
    chunks = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    tasks = [(str(output), f"{split}-{i:06d}.tar", chunk, source.zip_path, resolution, images_per_block)
             for i, chunk in enumerate(chunks)]
    entries = []
    bar = tqdm(total=len(items), desc=f"sharding {split}", unit="img", disable=not progress)
    parallel = workers > 1 and len(tasks) > 1
    with get_context("spawn").Pool(min(workers, len(tasks))) if parallel else contextlib.nullcontext() as pool:
        for entry in pool.imap_unordered(_write_shard, tasks) if parallel else map(_write_shard, tasks):
            entries.append(entry)
            bar.update(entry["count"] + len(entry["skipped"]))
            if on_shard is not None:
                on_shard(output / entry["name"])
    bar.close()
    entries.sort(key=lambda e: e["name"])
    fsync_dir(output)
    image = {"ext": "npy", "layout": "uint8 blocks, N x R x R x 3 (RGB)", "images_per_block": images_per_block,
             "crop": CROP_DOC}
    return _finish_manifest(source, output, resolution, split, entries, max_skip_fraction, image)


def _finish_manifest(source: Source, output: Path, resolution: int, split: str, entries: list[dict],
                     max_skip_fraction: float, image: dict) -> dict:
    skipped = [s for e in entries for s in e.pop("skipped")]
    count = sum(e["count"] for e in entries)
    for line in skipped[:20]:
        print(f"warning: skipped unreadable image {line}", file=sys.stderr)
    if skipped and len(skipped) > max_skip_fraction * (count + len(skipped)):
        raise UserError(f"input '{source.root}': {len(skipped)} of {count + len(skipped)} images unreadable, "
                        f"more than the allowed fraction {max_skip_fraction}; manifest not written")
    manifest = {
        "format": FORMAT,
        "count": count,
        "resolution": resolution,
        "split": split,
        "image": image,
        "attributes": list(ATTRIBUTE_NAMES) if source.kind != "folder" else [],
        "source": source.describe(),
        "skipped": {"count": len(skipped), "files": skipped[:1000]},
        "missing": {"count": len(source.missing), "files": source.missing[:1000]},
        "shards": entries,
    }
    atomic_write_text(output / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _check_writable(output: Path) -> None:
    try:
        probe_writable(output)
    except OSError as exc:
        raise UserError(f"output '{output}': not writable ({exc.strerror})") from None


def read_manifest(shards: Union[str, Path]) -> dict:
    """Load and sanity-check manifest.json, from a folder or a remote set (remote.py); every problem is
    a one-line UserError naming the path or URL."""
    if remote.is_remote(shards):
        url = remote.member(str(shards), MANIFEST)
        try:
            text = remote.with_retries(lambda: remote.fetch(url), url).decode()
        except OSError as exc:
            raise UserError(f"data.shards '{shards}': cannot read '{url}' ({exc})") from None
        return _check_manifest(text, url, lambda name: True)
    shards_dir = Path(shards)
    path = shards_dir / MANIFEST
    if not shards_dir.is_dir():
        raise UserError(f"data.shards '{shards_dir}': no such directory (make it with launch/shard.py)")
    if not path.is_file():
        raise UserError(f"data.shards '{shards_dir}': no {MANIFEST} (make the shards with launch/shard.py)")
    return _check_manifest(path.read_text(), str(path), lambda name: (shards_dir / name).is_file())


def _check_manifest(text: str, path: str, exists) -> dict:
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}': not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if manifest.get("format") in OLD_FORMATS:
        raise UserError(f"'{path}': shards in the older format {manifest['format']} (one JPEG per sample); "
                        f"re-shard with launch/shard.py to get {FORMAT}")
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("shards"), list):
        raise UserError(f"'{path}': not a {FORMAT} manifest")
    if manifest["count"] <= 0 or not manifest["shards"]:
        raise UserError(f"'{path}': the shard set is empty (count 0)")
    for entry in manifest["shards"]:
        if not exists(entry["name"]):
            raise UserError(f"'{path}': lists shard '{entry['name']}' which is missing from {Path(path).parent}")
    return manifest


def shard_paths(shards: Union[str, Path], manifest: Optional[dict] = None) -> list[str]:
    """Every shard's path, or URL (pipe: command) for a remote set."""
    manifest = manifest or read_manifest(shards)
    if remote.is_remote(shards):
        return [remote.member(str(shards), e["name"]) for e in manifest["shards"]]
    return [str(Path(shards) / e["name"]) for e in manifest["shards"]]


def verify_shards(shards: Union[str, Path], manifest: dict, cache: Optional[Path] = None) -> list[str]:
    """Check every shard's sha256 against the manifest; warn for each mismatch and return their names.

    Training goes on: the loader skips what it cannot read and counts it (`data_errors` in the metrics).
    A remote set is downloaded once for this, in order, a few shards ahead, into `cache` if given, where
    the loader then finds it.
    """
    bad = []
    paths = shard_paths(shards, manifest)
    contents = remote.fetch_ahead(paths, cache=cache) if remote.is_remote(shards) else ((p, None) for p in paths)
    for entry, (path, data) in zip(manifest["shards"], contents):
        digest = hashlib.sha256()
        if data is None:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        elif isinstance(data, bytes):
            digest.update(data)
        if digest.hexdigest() != entry["sha256"]:
            bad.append(entry["name"])
            reason = f"could not be read ({data})" if isinstance(data, OSError) else \
                "does not match the sha256 in its manifest (corrupt or changed since sharding)"
            print(f"warning: shard '{path}' {reason}; unreadable samples will be skipped and counted as "
                  "data_errors", file=sys.stderr, flush=True)
    return bad


def upload_file(path: Path, url: str) -> None:
    """Put one local file of a shard set at `url` (remote.py), with retries; a one-line UserError if not."""
    data = Path(path).read_bytes()
    try:
        remote.with_retries(lambda: remote.upload(url, data) or b"", url)
    except OSError as exc:
        raise UserError(f"output '{url}': upload failed ({exc})") from None


def write_shards_anywhere(source: Source, output: str, *args, **kwargs) -> dict:
    """`write_shards` to a folder, or to a remote set (remote.py): there the shards are written to a local
    temporary folder and uploaded one by one as they are done, and the manifest last, so a set without
    its manifest is incomplete, as on disk."""
    if not remote.is_remote(output):
        return write_shards(source, Path(output), *args, **kwargs)
    remote.member(output, MANIFEST)                  # a malformed pipe: template fails before any work

    def upload(path: Path) -> None:
        upload_file(path, remote.member(output, path.name))
        path.unlink()                                # local disk holds only the shards in flight

    with tempfile.TemporaryDirectory(prefix="dcgan-shards-") as local:
        manifest = write_shards(source, Path(local), *args, on_shard=upload, **kwargs)
        upload_file(Path(local) / MANIFEST, remote.member(output, MANIFEST))
    return manifest


def cache_folder(cache_dir: Optional[str], manifest: dict) -> Optional[Path]:
    """Where a remote set's shards are kept locally (data.cache_dir): one folder per manifest, so a set
    sharded again under the same URL never reads a stale copy."""
    if not cache_dir:
        return None
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"set-{digest}"
