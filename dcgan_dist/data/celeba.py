"""Read CelebA's official aligned layout (folder or zip), or a plain folder of images.

Accepted layouts for `--input DIR`:
  DIR/ or DIR/celeba/ holding
      img_align_celeba/000001.jpg ...   or   img_align_celeba.zip
      list_eval_partition.txt            "000001.jpg 0"  (0 train, 1 val, 2 test)     required
      list_attr_celeba.txt               count line, 40 names, "000001.jpg -1 1 ..."   required
      identity_CelebA.txt                "000001.jpg 2880"                              optional
  or any folder of images (searched recursively; no attributes, no split).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dcgan_dist.errors import UserError

ATTRIBUTE_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
SPLITS = {"train": 0, "val": 1, "test": 2}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# CelebA's official split sizes; the synthetic set keeps the same proportions.
OFFICIAL_SPLIT_SIZES = (162770, 19867, 19962)


def partition_of_index(index: int, num: int) -> int:
    total = sum(OFFICIAL_SPLIT_SIZES)
    train_end = round(num * OFFICIAL_SPLIT_SIZES[0] / total)
    val_end = round(num * (OFFICIAL_SPLIT_SIZES[0] + OFFICIAL_SPLIT_SIZES[1]) / total)
    return 0 if index < train_end else 1 if index < val_end else 2


@dataclass
class Item:
    key: str                          # sample key in the shards: no dots (webdataset splits at the first)
    ref: str                          # file path, or member name inside `Source.zip_path`
    meta: dict = field(default_factory=dict)


@dataclass
class Source:
    kind: str                         # "celeba", "celeba-zip" or "folder"
    root: Path
    items: list[Item]
    zip_path: Optional[Path] = None
    missing: list[str] = field(default_factory=list)   # listed in the metadata but not found

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.root.resolve()),
                "zip": str(self.zip_path.resolve()) if self.zip_path else None}


_open_zips: dict[Path, zipfile.ZipFile] = {}


def read_bytes(zip_path: Optional[Path], ref: str) -> bytes:
    """Read one image's bytes; keeps one open ZipFile per process (workers each open their own)."""
    if zip_path is None:
        return Path(ref).read_bytes()
    if zip_path not in _open_zips:
        _open_zips[zip_path] = zipfile.ZipFile(zip_path)
    return _open_zips[zip_path].read(ref)


def find_celeba_root(path: Path) -> Optional[Path]:
    for cand in (path, path / "celeba"):
        if any((cand / n).exists() for n in ("img_align_celeba", "img_align_celeba.zip",
                                             "list_eval_partition.txt", "list_attr_celeba.txt")):
            return cand
    return None


def open_source(path: Path, split: str) -> Source:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"input '{path}': not a directory (expected the CelebA folder or a folder of images)")
    root = find_celeba_root(path)
    if root is None:
        if split in ("val", "test"):
            raise UserError(f"input '{path}': a plain image folder has no '{split}' split; use --split all")
        return _open_folder(path)
    return _open_celeba(root, split)


def _open_folder(path: Path) -> Source:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"input '{path}': no CelebA metadata and no images ({', '.join(IMAGE_SUFFIXES)}) found")
    items = [Item(key=f"{i + 1:08d}", ref=str(p), meta={"file": str(p.relative_to(path))})
             for i, p in enumerate(files)]
    return Source(kind="folder", root=path, items=items)


def _open_celeba(root: Path, split: str) -> Source:
    images_dir, zip_path = root / "img_align_celeba", root / "img_align_celeba.zip"
    if (images_dir / "img_align_celeba").is_dir():        # unzipped into a folder of the same name
        images_dir = images_dir / "img_align_celeba"
    if images_dir.is_dir():
        available = {p.name: str(p) for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        kind, zip_used = "celeba", None
    elif zip_path.is_file():
        try:
            with zipfile.ZipFile(zip_path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            raise UserError(f"'{zip_path}': not a readable zip file") from None
        available = {Path(n).name: n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES}
        kind, zip_used = "celeba-zip", zip_path
    else:
        raise UserError(f"'{root}': found CelebA metadata but neither img_align_celeba/ nor img_align_celeba.zip")

    partitions = _read_partitions(root / "list_eval_partition.txt")
    attrs = _read_attributes(root / "list_attr_celeba.txt")
    identities = _read_identities(root / "identity_CelebA.txt")
    wanted = [n for n, s in partitions.items() if split == "all" or s == SPLITS[split]]
    items, missing = [], []
    for name in sorted(wanted):
        if name not in available:
            missing.append(name)
            continue
        if name not in attrs:
            raise UserError(f"'{root / 'list_attr_celeba.txt'}': no attributes for '{name}'")
        meta = {"file": name, "split": partitions[name], "attributes": attrs[name],
                "identity": identities.get(name, -1)}
        items.append(Item(key=Path(name).stem.replace(".", "_"), ref=available[name], meta=meta))
    return Source(kind=kind, root=root, items=items, zip_path=zip_used, missing=missing)


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"'{path}': required CelebA metadata file is missing")
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


def _read_partitions(path: Path) -> dict[str, int]:
    out = {}
    for n, line in enumerate(_lines(path), 1):
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise UserError(f"'{path}' line {n}: expected '<image> <0|1|2>', got {line!r}")
        out[parts[0]] = int(parts[1])
    return out


def _read_attributes(path: Path) -> dict[str, dict[str, int]]:
    lines = _lines(path)
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise UserError(f"'{path}' line 1: expected the image count, then a line of 40 attribute names")
    names = lines[1].split()
    if len(names) != len(ATTRIBUTE_NAMES):
        raise UserError(f"'{path}' line 2: expected {len(ATTRIBUTE_NAMES)} attribute names, got {len(names)}")
    out = {}
    for n, line in enumerate(lines[2:], 3):
        parts = line.split()
        if len(parts) != len(names) + 1 or any(v not in ("1", "-1") for v in parts[1:]):
            raise UserError(f"'{path}' line {n}: expected '<image>' and {len(names)} values of 1 or -1")
        out[parts[0]] = {k: int(v) for k, v in zip(names, parts[1:])}
    if int(lines[0]) != len(out):
        raise UserError(f"'{path}': header says {lines[0].strip()} images but {len(out)} rows follow")
    return out


def _read_identities(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    out = {}
    for n, line in enumerate(_lines(path), 1):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise UserError(f"'{path}' line {n}: expected '<image> <identity>', got {line!r}")
        out[parts[0]] = int(parts[1])
    return out
