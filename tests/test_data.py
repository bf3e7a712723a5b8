"""Synthetic CelebA layout, the CelebA reader and the sharder, all on real files and real tars."""
import hashlib
import json
import shutil
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from conftest import run
from dcgan_dist.data.celeba import ATTRIBUTE_NAMES, open_source
from dcgan_dist.data.shards import crop_resize, read_manifest, Sharding, write_shards
from dcgan_dist.data.synthetic import write_celeba
from dcgan_dist.errors import UserError


def test_synthetic_layout_matches_celeba(celeba_parent):
    root = celeba_parent / "celeba"
    images = sorted((root / "img_align_celeba").iterdir())
    assert [p.name for p in images[:2]] == ["000001.jpg", "000002.jpg"] and len(images) == 240
    assert Image.open(images[0]).size == (178, 218) and Image.open(images[0]).format == "JPEG"
    attr = (root / "list_attr_celeba.txt").read_text().splitlines()
    assert attr[0] == "240" and attr[1].split() == list(ATTRIBUTE_NAMES) and len(attr) == 242
    assert all(v in ("1", "-1") for v in attr[2].split()[1:]) and len(attr[2].split()) == 41
    parts = [ln.split() for ln in (root / "list_eval_partition.txt").read_text().splitlines()]
    splits = [int(s) for _, s in parts]
    assert splits == sorted(splits) and splits.count(0) == 193       # 80.3% train, as in CelebA
    assert len((root / "identity_CelebA.txt").read_text().splitlines()) == 240


def test_synthetic_is_deterministic(tmp_path, celeba_parent):
    write_celeba(tmp_path, num=12, seed=0, progress=False)
    for name in ("000001.jpg", "000012.jpg"):
        a = (tmp_path / "celeba/img_align_celeba" / name).read_bytes()
        assert a == (celeba_parent / "celeba/img_align_celeba" / name).read_bytes()
    other = tmp_path / "other"
    write_celeba(other, num=2, seed=1, progress=False)
    assert (other / "celeba/img_align_celeba/000001.jpg").read_bytes() != \
        (tmp_path / "celeba/img_align_celeba/000001.jpg").read_bytes()


def _attrs(root):
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    return {ln.split()[0]: dict(zip(ATTRIBUTE_NAMES, map(int, ln.split()[1:]))) for ln in lines[2:]}


def test_attributes_show_in_pixels(celeba_parent):
    """Eyeglasses darken the eye band; Smiling widens a mouth of a different colour than the skin."""
    root = celeba_parent / "celeba"
    attrs = _attrs(root)
    dark = {1: [], -1: []}
    for name, a in attrs.items():
        px = np.asarray(Image.open(root / "img_align_celeba" / name).convert("L"), np.float32)
        dark[a["Eyeglasses"]].append((px[100:125, 55:124] < 45).mean())
    assert len(dark[1]) >= 5
    assert np.mean(dark[1]) > np.mean(dark[-1]) + 0.05


def test_shards_round_trip_through_webdataset(shards32, celeba_parent):
    manifest = read_manifest(shards32)
    assert manifest["count"] == 193 and manifest["resolution"] == 32
    assert manifest["image"]["images_per_block"] == 16
    assert [s["count"] for s in manifest["shards"]] == [50, 50, 50, 43]
    for entry in manifest["shards"]:
        assert hashlib.sha256((shards32 / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
    root = celeba_parent / "celeba"
    expected = _attrs(root)
    urls = [str(shards32 / s["name"]) for s in manifest["shards"]]
    seen, block_sizes = [], []
    for block in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        pixels, metas = block["npy"], block["json"]
        assert pixels.dtype == np.uint8 and pixels.shape == (len(metas), 32, 32, 3)
        assert block["__key__"] == metas[0]["key"] and "." not in block["__key__"]
        block_sizes.append(len(metas))
        for image, meta in zip(pixels, metas):
            assert meta["attributes"] == expected[meta["file"]]
            assert meta["file"] == meta["key"] + ".jpg" and meta["split"] == 0 and meta["identity"] >= 1
            # Stored raw: exactly the sharder's crop of the source, with no second lossy step.
            source = crop_resize((root / "img_align_celeba" / meta["file"]).read_bytes(), 32)
            assert np.array_equal(image, np.asarray(source)), meta["file"]
            seen.append(meta["file"])
    assert len(seen) == len(set(seen)) == 193
    assert block_sizes[:4] == [16, 16, 16, 2]          # blocks never straddle shards
    # Plain `tar` tooling sees ordinary members too.
    with tarfile.open(urls[0]) as tar:
        assert tar.getnames()[:4] == ["000001.npy", "000001.json", "000017.npy", "000017.json"]


def test_sharding_is_byte_identical_and_zip_equals_folder(tmp_path, celeba_parent, shards32):
    # Zip the images the way CelebA ships them, and hide the folder so the zip must be used.
    src = tmp_path / "celeba"
    shutil.copytree(celeba_parent / "celeba", src, ignore=shutil.ignore_patterns("img_align_celeba"))
    with zipfile.ZipFile(src / "img_align_celeba.zip", "w") as zf:
        for p in sorted((celeba_parent / "celeba/img_align_celeba").iterdir()):
            zf.write(p, f"img_align_celeba/{p.name}")
    source = open_source(tmp_path, "train")       # the parent: torchvision's layout
    assert source.kind == "celeba-zip"
    manifest = write_shards(source, tmp_path / "out",
                            Sharding(resolution=32, split="train", shard_size=50, workers=1, progress=False, images_per_block=16))
    reference = read_manifest(shards32)            # written from the folder with 2 workers
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]


def test_splits_and_plain_folder(tmp_path, celeba_parent):
    counts = {s: len(open_source(celeba_parent, s).items) for s in ("train", "val", "test", "all")}
    assert counts["train"] + counts["val"] + counts["test"] == counts["all"] == 240
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(folder / f"img.{i}.png")
    manifest = write_shards(open_source(tmp_path / "imgs", "all"), tmp_path / "out",
                            Sharding(resolution=32, split="all", progress=False))
    assert manifest["count"] == 3 and manifest["source"]["kind"] == "folder" and manifest["attributes"] == []


def test_missing_metadata_names_the_file(tmp_path, celeba_parent):
    shutil.copytree(celeba_parent / "celeba", tmp_path / "celeba")
    (tmp_path / "celeba/list_eval_partition.txt").unlink()
    with pytest.raises(UserError, match="list_eval_partition.txt"):
        open_source(tmp_path, "train")


def test_shard_cli_progress_and_errors(tmp_path, celeba_parent):
    out = run([sys.executable, "launch/shard.py", "--input", celeba_parent, "--output", tmp_path / "s",
               "--resolution", "32", "--split", "val", "--shard-size", "10", "--workers", "2"], timeout=120)
    assert out.returncode == 0, out.stderr
    assert "sharding val" in out.stderr and "100%" in out.stderr
    assert json.loads((tmp_path / "s/manifest.json").read_text())["split"] == "val"
    bad = run([sys.executable, "launch/shard.py", "--input", tmp_path / "nothing", "--output", tmp_path / "x"],
              timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"error: input '{tmp_path / 'nothing'}': not a directory (expected the CelebA folder or a folder of images)"]
