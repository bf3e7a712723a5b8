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

import dataclasses
import hashlib
import io
import itertools
import json
import queue
import re
import tarfile
import tempfile
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from dcgan_dist.data import remote
from dcgan_dist.data.celeba import ATTRIBUTE_NAMES, Source, read_bytes
from dcgan_dist.errors import UserError, warn
from dcgan_dist.fsutil import atomic_write_bytes, atomic_write_text, file_sha256, fsync_dir, probe_writable
from dcgan_dist.redact import redact

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
    """`on_shard(path)` is called in this process as each shard is complete on disk (to upload it); no
    new shard is started meanwhile, so at most `workers + 1` finished shards ever wait for it."""
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
    window = workers + 1 if on_shard is not None else 2 * workers
    for entry in _encode(tasks, workers, window):
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


def _encode(tasks: list[tuple], workers: int, window: int) -> Iterator[dict]:
    """Each task's manifest entry as its shard is done, in `workers` processes, with at most `window`
    tasks started and not yet handed back: a caller that uploads each shard holds the encoding back
    (a pool's imap would run ahead and pile every finished shard up on local disk)."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_write_shard, tasks)
        return
    done: queue.Queue = queue.Queue()
    todo = iter(tasks)
    with get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        def start(n: int) -> int:
            started = 0
            for task in itertools.islice(todo, n):
                pool.apply_async(_write_shard, (task,), callback=done.put, error_callback=done.put)
                started += 1
            return started

        in_flight = start(window)
        while in_flight:
            entry = done.get()
            if isinstance(entry, BaseException):
                raise entry
            yield entry
            in_flight += start(1) - 1


def _finish_manifest(source: Source, output: Path, resolution: int, split: str, entries: list[dict],
                     max_skip_fraction: float, image: dict) -> dict:
    skipped = [s for e in entries for s in e.pop("skipped")]
    count = sum(e["count"] for e in entries)
    for line in skipped[:20]:
        warn(f"skipped unreadable image {line}")
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


# ----------------------------------------------------------------------------------------------------
# Reading a set. Nothing in a manifest or a shard is trusted unchecked (docs/TRUST.md): names must be
# plain file names, sizes and counts must fit the format, and every shard's bytes must match the
# manifest's sha256 before they are read.

SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.tar$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
NPY_HEADER_MAX = 4096              # np.save writes 128 bytes for these arrays; anything near this is forged
JSON_PER_IMAGE_MAX = 8192          # one record: key, 40 attributes, identity, split, source file name
TAR_OVERHEAD = 1024                # a tar header and padding per member, plus the end-of-archive blocks


@dataclass(frozen=True)
class Shard:
    """One file of a set, as its manifest describes it."""

    location: str                   # the set's: a folder, a URL prefix or a pipe: template
    name: str                       # a plain file name (SHARD_NAME)
    bytes: int
    sha256: str
    count: int
    remote: bool                    # the set's, decided once when it is opened

    @property
    def path(self) -> str:
        """The local file, or the URL (the command, for pipe:) it is read from."""
        return remote.member(self.location, self.name) if self.remote else str(Path(self.location) / self.name)

    @property
    def shown(self) -> str:
        """`path` as messages show it: without credentials."""
        return redact(self.path)


@dataclass(frozen=True)
class ShardSet:
    """A checked manifest and its shards: what the loader, the evaluator and the classifier read."""

    location: str
    manifest: dict
    shards: tuple[Shard, ...]
    remote: bool                    # a URL or pipe: set rather than a folder: asked here, once
    cache: Optional[Path] = None    # a remote set's local copies (data.cache_dir), read before downloading

    @classmethod
    def open(cls, location: Union[str, Path], cache: Optional[str] = None) -> "ShardSet":
        manifest = read_manifest(location)
        far = remote.is_remote(str(location))
        shards = tuple(Shard(str(location), e["name"], e["bytes"], e["sha256"], e["count"], far)
                       for e in manifest["shards"])
        return cls(str(location), manifest, shards, far, Path(cache) if cache and far else None)

    @property
    def shown(self) -> str:
        """Where the set is, as files and messages may show it: a folder as an absolute path, a remote
        set without its credentials."""
        return redact(self.location) if self.remote else str(Path(self.location).resolve())

    @property
    def resolution(self) -> int:
        return self.manifest["resolution"]

    @property
    def digest(self) -> str:
        return manifest_digest(self.manifest)

    def member_limits(self) -> dict[str, int]:
        """The largest .npy and .json tar member a block of this set can be."""
        n, r = self.manifest["image"]["images_per_block"], self.resolution
        return {"npy": NPY_HEADER_MAX + n * r * r * 3, "json": n * JSON_PER_IMAGE_MAX}

    def without(self, names: set[str]) -> "ShardSet":
        return dataclasses.replace(self, shards=tuple(s for s in self.shards if s.name not in names))


def manifest_digest(manifest: dict) -> str:
    """What a set's caches are keyed by: a set sharded again in place gets a new one."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(shards: Union[str, Path]) -> dict:
    """Load and check manifest.json, from a folder or a remote set (remote.py); every problem is a
    one-line UserError naming the path or URL."""
    if remote.is_remote(shards):
        where = redact(remote.member(str(shards), MANIFEST))
        try:
            text = remote.with_retries(lambda: remote.fetch(str(shards), MANIFEST), where).decode()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"data.shards '{redact(str(shards))}': cannot read '{where}' ({exc})") from None
        return _check_manifest(text, where, lambda name: True)
    shards_dir = Path(shards)
    path = shards_dir / MANIFEST
    if not shards_dir.is_dir():
        raise UserError(f"data.shards '{shards_dir}': no such directory (make it with launch/shard.py)")
    if not path.is_file():
        raise UserError(f"data.shards '{shards_dir}': no {MANIFEST} (make the shards with launch/shard.py)")
    if path.stat().st_size > remote.MAX_UNSIZED_BYTES:
        raise UserError(f"'{path}': {path.stat().st_size} bytes, more than a manifest can be "
                        f"({remote.MAX_UNSIZED_BYTES})")
    return _check_manifest(path.read_text(), str(path), lambda name: (shards_dir / name).is_file())


def _check_manifest(text: str, path: str, exists: Callable[[str], bool]) -> dict:
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}': not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"'{path}': not a {FORMAT} manifest")
    if manifest.get("format") in OLD_FORMATS:
        raise UserError(f"'{path}': shards in the older format {manifest['format']} (one JPEG per sample); "
                        f"re-shard with launch/shard.py to get {FORMAT}")
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("shards"), list):
        raise UserError(f"'{path}': not a {FORMAT} manifest")
    _check_fields(manifest, path)
    if manifest["count"] == 0 or not manifest["shards"]:
        raise UserError(f"'{path}': the shard set is empty (count 0)")
    for entry in manifest["shards"]:
        if not exists(entry["name"]):
            raise UserError(f"'{path}': lists shard '{entry['name']}' which is missing from {Path(path).parent}")
    return manifest


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_fields(manifest: dict, path: str) -> None:
    """Every field the readers use, with the type and range the format allows: a manifest is data from
    whoever made the set, and a name in it becomes part of a path, a URL or a command."""
    def bad(what: str, expected: str):
        raise UserError(f"'{path}': {what}: expected {expected}")

    if not _is_int(manifest.get("count")):
        bad(f"count {manifest.get('count')!r}", "a count of images")
    if manifest.get("resolution") not in (32, 64, 128):
        bad(f"resolution {manifest.get('resolution')!r}", "32, 64 or 128")
    image = manifest.get("image")
    if not isinstance(image, dict) or not _is_int(image.get("images_per_block"), 1):
        bad("image.images_per_block", "a positive count of images per block")
    per_image = manifest["resolution"] ** 2 * 3 + JSON_PER_IMAGE_MAX
    names = set()
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict):
            bad(f"shard entry {i}", "an object with name, count, bytes and sha256")
        name = entry.get("name")
        if not isinstance(name, str) or not SHARD_NAME.match(name):
            bad(f"shard entry {i} has name {str(name)[:80]!r}", "a plain file name (letters, digits and ._-, "
                "ending in .tar)")
        if name in names:
            bad(f"shard '{name}' is listed twice", "each shard once")
        names.add(name)
        if not _is_int(entry.get("count")) or not _is_int(entry.get("bytes"), 1):
            bad(f"shard '{name}' count {entry.get('count')!r}, bytes {entry.get('bytes')!r}", "non-negative integers")
        blocks = -(-entry["count"] // image["images_per_block"])
        most = entry["count"] * per_image + (2 * blocks + 2) * (TAR_OVERHEAD + NPY_HEADER_MAX)
        if entry["bytes"] > most:
            bad(f"shard '{name}' claims {entry['bytes']} bytes for {entry['count']} images",
                f"at most {most} at {manifest['resolution']} px")
        if not isinstance(entry.get("sha256"), str) or not SHA256_HEX.match(entry["sha256"]):
            bad(f"shard '{name}' sha256 {str(entry.get('sha256'))[:80]!r}", "64 lowercase hex digits")
    if sum(e["count"] for e in manifest["shards"]) != manifest["count"]:
        bad(f"count {manifest['count']}", f"the sum of the shards' counts, {sum(e['count'] for e in manifest['shards'])}")


def verify(shard_set: ShardSet, shards: list[Shard]) -> dict[str, str]:
    """{name: why} for each of `shards` whose bytes do not match its manifest entry. A local file is
    hashed where it lies; a remote one is downloaded (into the set's cache, if any, for the loader)."""
    bad = {}
    local = [s for s in shards if not s.remote]
    for shard in local:
        problem = _local_problem(shard)
        if problem:
            bad[shard.name] = problem
    remote_shards = [s for s in shards if s.remote]
    for shard, data in remote.fetch_ahead(remote_shards, lambda s: fetch_shard(s, shard_set.cache)):
        if isinstance(data, OSError):
            bad[shard.name] = f"could not be read ({data})"
    return bad


def _local_problem(shard: Shard) -> Optional[str]:
    try:
        size = Path(shard.path).stat().st_size
        if size != shard.bytes:
            return f"is {size} bytes, not the {shard.bytes} its manifest gives"
        digest = file_sha256(Path(shard.path))
    except OSError as exc:
        return f"could not be read ({exc.strerror})"
    if digest != shard.sha256:
        return "does not match the sha256 in its manifest (corrupt or changed since sharding)"
    return None


def checked_bytes(shard: Shard, data: bytes) -> bytes:
    """`data`, if it is what the manifest says shard `shard` holds; else an OSError saying how not."""
    if len(data) != shard.bytes:
        raise OSError(f"{len(data)} bytes, not the {shard.bytes} its manifest gives")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        raise OSError("does not match the sha256 in its manifest")
    return data


_cache_checked: set[Path] = set()           # cached files hashed by this process already


def fetch_shard(shard: Shard, cache: Optional[Path] = None,
                on_retry: Optional[Callable[[str], None]] = None) -> Union[bytes, OSError]:
    """A remote shard's bytes, checked against its manifest entry, or the error that stopped it after
    its retries. With `cache`, a folder on local disk, checked bytes are kept there (named by their
    sha256, so a set sharded again never reads a stale copy) and read from there later; a cached copy is
    hashed again the first time this process reads it, and downloaded afresh if it does not match."""
    local = Path(cache) / f"{shard.sha256}.tar" if cache is not None else None
    if local is not None and local.is_file():
        try:
            data = local.read_bytes()
            if local not in _cache_checked:
                checked_bytes(shard, data)
                _cache_checked.add(local)
            return data
        except OSError:
            local.unlink(missing_ok=True)
    try:
        data = remote.with_retries(lambda: checked_bytes(shard, remote.fetch(shard.location, shard.name, shard.bytes)),
                                   shard.shown, on_retry)
    except OSError as exc:
        return exc
    if local is not None:
        try:
            atomic_write_bytes(local, data)
            _cache_checked.add(local)
        except OSError:
            pass                          # a full or read-only cache only costs the next download
    return data


def upload_file(path: Path, location: str, name: str) -> None:
    """Put one local file of a shard set at `location` (remote.py), with retries; a one-line UserError if not."""
    data = Path(path).read_bytes()
    where = redact(remote.member(location, name))
    try:
        remote.with_retries(lambda: remote.upload(location, name, data), where)
    except OSError as exc:
        raise UserError(f"output '{where}': upload failed ({exc})") from None


def write_shards_anywhere(source: Source, output: str, *args, **kwargs) -> dict:
    """`write_shards` to a folder, or to a remote set (remote.py): there the shards are written to a local
    temporary folder and uploaded one by one as they are done, and the manifest last, so a set without
    its manifest is incomplete, as on disk."""
    if not remote.is_remote(output):
        return write_shards(source, Path(output), *args, **kwargs)
    remote.member(output, MANIFEST)                  # a malformed pipe: template fails before any work

    def upload(path: Path) -> None:
        upload_file(path, output, path.name)
        path.unlink()                                # local disk holds only the shards in flight

    with tempfile.TemporaryDirectory(prefix="dcgan-shards-") as local:
        manifest = write_shards(source, Path(local), *args, on_shard=upload, **kwargs)
        upload_file(Path(local) / MANIFEST, output, MANIFEST)
    return manifest
