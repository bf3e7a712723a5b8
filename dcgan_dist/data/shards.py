"""Shard sets: webdataset tar shards + manifest.json, written from a CelebA layout or an image folder,
read back only once every name, size and digest in them has been checked (docs/TRUST.md).

A shard holds blocks of images, two tar members each: `000001.npy` (uint8, N x R x R x 3, RGB) and
`000001.json` (N records: key, 40 attributes, identity, split, source file), keyed by the block's first
image. Blocks, not a member per image, make the loader a file read and a memcpy per 256 images instead of
a tar header and a JPEG decode per image (20x the rate, docs/PERFORMANCE.md); raw pixels keep the stored
images exactly the crop, with no second lossy step. Plain `tar` and `webdataset` read them as they are.

Shards are byte-identical for the same input (members sorted, tar header fields fixed) and written
atomically; the manifest comes last, so its presence means the set is complete.
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
from dcgan_dist.fsutil import atomic_write_bytes, atomic_write_text, fsync_dir, probe_writable
from dcgan_dist.redact import redact

MANIFEST = "manifest.json"
FORMAT = "dcgan-dist-shards/2"
IMAGES_PER_BLOCK = 256
# The centred square of side min(w, h): for CelebA's 178x218, rows 20..197, the region the DCGAN
# tutorials' Resize(R) + CenterCrop(R) keep; then an antialiased resize.
CROP_DOC = "centre square of side min(w, h), Lanczos resize to resolution x resolution"


@dataclass(frozen=True)
class Sharding:
    """How a set is written (launch/shard.py's flags)."""

    resolution: int = 64
    split: str = "train"
    shard_size: int = 1000                  # images per shard
    images_per_block: int = IMAGES_PER_BLOCK
    workers: int = 1                        # encoder processes
    max_skip_fraction: float = 0.01         # of unreadable images, before the set is refused
    progress: bool = True


def crop_resize(data: bytes, resolution: int) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (2 * resolution, 2 * resolution))  # JPEG: DCT-downscale only while >= 2x the target
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(payload), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(payload))


def _write_shard(task: tuple) -> dict:
    """Worker: crop and resize one shard's images into `<name>.tar`. Returns its manifest entry."""
    out_dir, name, items, zip_path, how = task
    pixels, metas, skipped = [], [], []
    for item in items:
        try:
            pixels.append(np.asarray(crop_resize(read_bytes(zip_path, item.ref), how.resolution)))
        except Exception as exc:  # corrupt, truncated, zero-byte or not an image at all
            skipped.append(f"{item.meta.get('file', item.ref)}: {type(exc).__name__}")
            continue
        metas.append({"key": item.key, **item.meta})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(0, len(pixels), how.images_per_block):
            npy = io.BytesIO()
            np.save(npy, np.stack(pixels[i:i + how.images_per_block]), allow_pickle=False)
            _tar_member(tar, f"{metas[i]['key']}.npy", npy.getvalue())
            _tar_member(tar, f"{metas[i]['key']}.json",
                        json.dumps(metas[i:i + how.images_per_block], sort_keys=True).encode())
    data = buf.getvalue()
    atomic_write_bytes(Path(out_dir) / name, data)
    return {"name": name, "count": len(pixels), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "skipped": skipped}


def write_shards(source: Source, output: Union[str, Path], how: Sharding) -> dict:
    """The set of `source` at `output`: a folder, or a remote set (remote.py), whose shards are written to a
    local temporary folder and uploaded one by one as they are done, the manifest last."""
    if not remote.is_remote(output):
        return _write_local(source, Path(output), how)
    remote.member(str(output), MANIFEST)             # a malformed pipe: template fails before any work
    with tempfile.TemporaryDirectory(prefix="dcgan-shards-") as local:
        manifest = _write_local(source, Path(local), how, upload_to=str(output))
        _upload(Path(local) / MANIFEST, str(output))
    return manifest


def _upload(path: Path, location: str) -> None:
    data, where = path.read_bytes(), redact(remote.member(location, path.name))
    try:
        remote.with_retries(lambda: remote.upload(location, path.name, data), where)
    except OSError as exc:
        raise UserError(f"output '{where}': upload failed ({exc})") from None


def _write_local(source: Source, output: Path, how: Sharding, upload_to: Optional[str] = None) -> dict:
    try:
        probe_writable(output)
    except OSError as exc:
        raise UserError(f"output '{output}': not writable ({exc.strerror})") from None
    if not source.items:
        raise UserError(f"input '{source.root}': no images found for split '{how.split}'")
    chunks = [source.items[i:i + how.shard_size] for i in range(0, len(source.items), how.shard_size)]
    tasks = [(str(output), f"{how.split}-{i:06d}.tar", chunk, source.zip_path, how) for i, chunk in enumerate(chunks)]
    entries = []
    bar = tqdm(total=len(source.items), desc=f"sharding {how.split}", unit="img", disable=not how.progress)
    # An upload holds the encoding back: at most workers + 1 finished shards wait on local disk.
    for entry in _encode(tasks, how.workers, how.workers + 1 if upload_to else 2 * how.workers):
        entries.append(entry)
        bar.update(entry["count"] + len(entry["skipped"]))
        if upload_to:
            _upload(output / entry["name"], upload_to)
            (output / entry["name"]).unlink()
    bar.close()
    fsync_dir(output)
    skipped = [s for e in entries for s in e.pop("skipped")]
    count = sum(e["count"] for e in entries)
    for line in skipped[:20]:
        warn(f"skipped unreadable image {line}")
    if skipped and len(skipped) > how.max_skip_fraction * (count + len(skipped)):
        raise UserError(f"input '{source.root}': {len(skipped)} of {count + len(skipped)} images unreadable, "
                        f"more than the allowed fraction {how.max_skip_fraction}; manifest not written")
    manifest = {"format": FORMAT, "count": count, "resolution": how.resolution, "split": how.split,
                "image": {"ext": "npy", "layout": "uint8 blocks, N x R x R x 3 (RGB)",
                          "images_per_block": how.images_per_block, "crop": CROP_DOC},
                "attributes": list(ATTRIBUTE_NAMES) if source.kind != "folder" else [],
                "source": source.describe(), "skipped": {"count": len(skipped), "files": skipped[:1000]},
                "missing": {"count": len(source.missing), "files": source.missing[:1000]},
                "shards": sorted(entries, key=lambda e: e["name"])}
    atomic_write_text(output / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _encode(tasks: list[tuple], workers: int, window: int) -> Iterator[dict]:
    """Each task's manifest entry as its shard is done, in `workers` processes, with at most `window`
    tasks started and not handed back (a pool's imap would run ahead of an uploading caller)."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_write_shard, tasks)
        return
    done: queue.Queue = queue.Queue()
    todo = iter(tasks)
    with get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        def start(n: int) -> int:
            started = list(itertools.islice(todo, n))
            for task in started:
                pool.apply_async(_write_shard, (task,), callback=done.put, error_callback=done.put)
            return len(started)

        in_flight = start(window)
        while in_flight:
            entry = done.get()
            if isinstance(entry, BaseException):
                raise entry
            yield entry
            in_flight += start(1) - 1


# ----------------------------------------------------------------------------------------------------
# Reading a set. Nothing in a manifest or a shard is trusted unchecked: names must be plain file names,
# sizes and counts must fit the format, and a shard's bytes must match its sha256 before they are read.

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
    """A checked manifest and its shards: what the loader, the evaluation and the classifier read."""

    location: str
    manifest: dict
    shards: tuple[Shard, ...]
    remote: bool                    # a URL or pipe: set rather than a folder: asked here, once
    cache: Optional[Path] = None    # a remote set's local copies (data.cache_dir), read before downloading

    @classmethod
    def open(cls, location: Union[str, Path], cache: Optional[str] = None) -> "ShardSet":
        manifest, far = read_manifest(location), remote.is_remote(location)
        shards = tuple(Shard(str(location), e["name"], e["bytes"], e["sha256"], e["count"], far)
                       for e in manifest["shards"])
        return cls(str(location), manifest, shards, far, Path(cache) if cache and far else None)

    @property
    def shown(self) -> str:
        """Where the set is, as files and messages show it: a folder's absolute path, a URL without secrets."""
        return redact(self.location) if self.remote else str(Path(self.location).resolve())

    @property
    def resolution(self) -> int:
        return self.manifest["resolution"]

    @property
    def digest(self) -> str:
        """What a set's caches are keyed by: a set sharded again in place gets a new one."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:16]

    def member_limits(self) -> dict[str, int]:
        """The largest .npy and .json tar member a block of this set can be."""
        n, r = self.manifest["image"]["images_per_block"], self.resolution
        return {"npy": NPY_HEADER_MAX + n * r * r * 3, "json": n * JSON_PER_IMAGE_MAX}

    def without(self, names: set[str]) -> "ShardSet":
        return dataclasses.replace(self, shards=tuple(s for s in self.shards if s.name not in names))


def read_manifest(shards: Union[str, Path]) -> dict:
    """manifest.json of a folder or a remote set, checked; every problem is a one-line UserError naming
    the path or URL."""
    if remote.is_remote(shards):
        where = redact(remote.member(str(shards), MANIFEST))
        try:
            text = remote.with_retries(lambda: remote.fetch(str(shards), MANIFEST), where).decode()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"data.shards '{redact(str(shards))}': cannot read '{where}' ({exc})") from None
        return _check_manifest(text, where, lambda name: True)
    folder = Path(shards)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"data.shards '{folder}': no such directory (make it with launch/shard.py)")
    if not path.is_file():
        raise UserError(f"data.shards '{folder}': no {MANIFEST} (make the shards with launch/shard.py)")
    if path.stat().st_size > remote.MAX_UNSIZED_BYTES:
        raise UserError(f"'{path}': {path.stat().st_size} bytes, more than a manifest can be "
                        f"({remote.MAX_UNSIZED_BYTES})")
    return _check_manifest(path.read_text(), str(path), lambda name: (folder / name).is_file())


def _check_manifest(text: str, path: str, exists: Callable[[str], bool]) -> dict:
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}': not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(manifest, dict) and manifest.get("format") == "dcgan-dist-shards/1":
        raise UserError(f"'{path}': shards in the older format dcgan-dist-shards/1 (one JPEG per sample); "
                        f"re-shard with launch/shard.py to get {FORMAT}")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("shards"), list):
        raise UserError(f"'{path}': not a {FORMAT} manifest")
    _check_fields(manifest, path)
    if manifest["count"] == 0 or not manifest["shards"]:
        raise UserError(f"'{path}': the shard set is empty (count 0)")
    for entry in manifest["shards"]:
        if not exists(entry["name"]):
            raise UserError(f"'{path}': lists shard '{entry['name']}' which is missing from {Path(path).parent}")
    return manifest


def _check_fields(manifest: dict, path: str) -> None:
    """Every field the readers use, with the type and range the format allows: a manifest is data from
    whoever made the set, and a name in it becomes part of a path, a URL or a command."""
    def bad(what: str, expected: str):
        raise UserError(f"'{path}': {what}: expected {expected}")

    count = lambda value, low=0: isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not count(manifest.get("count")):
        bad(f"count {manifest.get('count')!r}", "a count of images")
    if manifest.get("resolution") not in (32, 64, 128):
        bad(f"resolution {manifest.get('resolution')!r}", "32, 64 or 128")
    image = manifest.get("image")
    if not isinstance(image, dict) or not count(image.get("images_per_block"), 1):
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
        if not count(entry.get("count")) or not count(entry.get("bytes"), 1):
            bad(f"shard '{name}' count {entry.get('count')!r}, bytes {entry.get('bytes')!r}", "non-negative integers")
        blocks = -(-entry["count"] // image["images_per_block"])
        most = entry["count"] * per_image + (2 * blocks + 2) * (TAR_OVERHEAD + NPY_HEADER_MAX)
        if entry["bytes"] > most:
            bad(f"shard '{name}' claims {entry['bytes']} bytes for {entry['count']} images",
                f"at most {most} at {manifest['resolution']} px")
        if not isinstance(entry.get("sha256"), str) or not SHA256_HEX.match(entry["sha256"]):
            bad(f"shard '{name}' sha256 {str(entry.get('sha256'))[:80]!r}", "64 lowercase hex digits")
    total = sum(e["count"] for e in manifest["shards"])
    if total != manifest["count"]:
        bad(f"count {manifest['count']}", f"the sum of the shards' counts, {total}")


class Mismatch(OSError):
    """Bytes that are not what the manifest says the shard holds."""


def checked_bytes(shard: Shard, data: bytes) -> bytes:
    """`data`, if it is what the manifest says shard `shard` holds; else a Mismatch saying how not."""
    if len(data) != shard.bytes:
        raise Mismatch(f"is {len(data)} bytes, not the {shard.bytes} its manifest gives")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        raise Mismatch("does not match the sha256 in its manifest (corrupt or changed since sharding)")
    return data


def verify(shard_set: ShardSet, shards: list[Shard]) -> dict[str, str]:
    """{name: why} for each of `shards` whose bytes do not match its manifest entry. A remote one is
    downloaded (into the set's cache, if any, where the loader finds it)."""
    if shard_set.remote:
        found = remote.fetch_ahead(shards, lambda s: fetch_shard(s, shard_set.cache))
    else:
        found = ((s, _read_local(s)) for s in shards)
    return {s.name: str(error) if isinstance(error, Mismatch) else f"could not be read ({error.strerror or error})"
            for s, error in found if isinstance(error, OSError)}


def _read_local(shard: Shard) -> Union[bytes, OSError]:
    try:
        return checked_bytes(shard, Path(shard.path).read_bytes())
    except OSError as exc:
        return exc


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
