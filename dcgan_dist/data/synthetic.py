"""Procedural face-like images in CelebA's exact aligned layout, for the demo and the tests.

Real CelebA cannot be downloaded here (no network), so the project draws its own: 178x218 JPEGs with the
face where CelebA's aligner puts it, plus the four metadata files with CelebA's names and formats.
Several attributes really show in the pixels (Smiling, Eyeglasses, hair colour, Bald, Bangs,
Wearing_Hat, Wearing_Lipstick, Pale_Skin, Male, No_Beard, Mouth_Slightly_Open), so conditional and
attribute features later have something to learn. Everything is a pure function of (seed, index).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from dcgan_dist.data.celeba import ATTRIBUTE_NAMES, partition_of_index
from dcgan_dist.fsutil import atomic_write_bytes, atomic_write_text

WIDTH, HEIGHT = 178, 218
HAIR_RGB = {
    "Black_Hair": (25, 20, 18), "Brown_Hair": (95, 60, 35),
    "Blond_Hair": (225, 190, 120), "Gray_Hair": (160, 160, 165),
}


@dataclass
class Identity:
    skin: np.ndarray         # RGB
    face_w: float            # half-width in px
    face_h: float            # half-height in px
    hair: str                # one of HAIR_RGB
    male: bool
    eye_rgb: tuple


def _identity(seed: int, ident: int) -> Identity:
    rng = np.random.default_rng([seed, 1, ident])
    male = bool(rng.random() < 0.42)
    tone = rng.uniform(0.35, 1.0)
    skin = np.array([255 * tone, 200 * tone ** 1.1, 165 * tone ** 1.3]) + rng.normal(0, 6, 3)
    hair = rng.choice(list(HAIR_RGB), p=[0.35, 0.3, 0.2, 0.15])
    return Identity(skin=np.clip(skin, 40, 255), face_w=rng.uniform(36, 46) + 3 * male,
                    face_h=rng.uniform(50, 60), hair=str(hair), male=male,
                    eye_rgb=tuple(int(c) for c in rng.integers(20, 110, 3)))


def _attributes(rng: np.random.Generator, who: Identity) -> dict[str, int]:
    a = {name: int(rng.random() < 0.25) for name in ATTRIBUTE_NAMES}  # background rate for the rest
    a["Male"] = int(who.male)
    a["Smiling"] = int(rng.random() < 0.48)
    a["Mouth_Slightly_Open"] = int(rng.random() < (0.6 if a["Smiling"] else 0.3))
    a["Eyeglasses"] = int(rng.random() < 0.12)
    a["Wearing_Hat"] = int(rng.random() < 0.08)
    a["Bald"] = int(who.male and not a["Wearing_Hat"] and rng.random() < 0.15)
    a["Bangs"] = int(not a["Bald"] and not a["Wearing_Hat"] and rng.random() < 0.2)
    for hair in HAIR_RGB:
        a[hair] = int(hair == who.hair and not a["Bald"])
    a["Pale_Skin"] = int(who.skin.mean() > 185)
    a["No_Beard"] = int(not who.male or rng.random() < 0.6)
    a["Wearing_Lipstick"] = int(not who.male and rng.random() < 0.5)
    a["Heavy_Makeup"] = int(a["Wearing_Lipstick"] and rng.random() < 0.6)
    return a


STYLES = ("studio", "street")


def _backdrop(rng: np.random.Generator, style: str) -> Image.Image:
    """studio: a muted vertical gradient, lit from above. street: the same under a clutter of coloured
    blocks and discs (windows, signs, foliage), a second, harder set to check a recipe was not tuned
    to the first."""
    top, bottom = rng.uniform(70, 210, 3), rng.uniform(40, 170, 3)
    ramp = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]
    backdrop = (top * (1 - ramp) + bottom * ramp) * np.ones((1, WIDTH, 1))
    img = Image.fromarray(backdrop.astype(np.uint8))
    if style == "street":
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(6, 14))):
            x, y = rng.uniform(-20, WIDTH), rng.uniform(-20, HEIGHT)
            w, h = rng.uniform(10, 70, 2)
            fill = tuple(int(c) for c in rng.integers(0, 255, 3))
            (d.rectangle if rng.random() < 0.6 else d.ellipse)([x, y, x + w, y + h], fill=fill)
    return img


def draw_face(seed: int, index: int, who: Identity, style: str = "studio") -> tuple[Image.Image, dict[str, int]]:
    """One 178x218 RGB image and its attributes (1/0), deterministic in (seed, index, style)."""
    rng = np.random.default_rng([seed, 2, index])
    a = _attributes(rng, who)
    img = _backdrop(rng, style)
    d = ImageDraw.Draw(img)
    cx, cy = WIDTH / 2 + rng.normal(0, 2), 122 + rng.normal(0, 2)  # CelebA aligns eyes near y = 112
    fw, fh = who.face_w * rng.uniform(0.96, 1.04), who.face_h * rng.uniform(0.96, 1.04)
    skin = tuple(int(c) for c in np.clip(who.skin * rng.uniform(0.92, 1.06), 0, 255))
    hair = HAIR_RGB[who.hair]
    cloth = tuple(int(c) for c in rng.integers(0, 255, 3))

    d.ellipse([cx - 70, HEIGHT - 30, cx + 70, HEIGHT + 70], fill=cloth)                 # shoulders
    d.rectangle([cx - 16, cy + fh - 15, cx + 16, HEIGHT - 20], fill=skin)               # neck
    if not a["Bald"]:
        long_hair = not who.male and rng.random() < 0.8
        d.ellipse([cx - fw - 10, cy - fh - 14, cx + fw + 10, cy + (fh + 30 if long_hair else 5)], fill=hair)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)                          # face
    if a["Bangs"]:
        d.chord([cx - fw, cy - fh - 4, cx + fw, cy - fh * 0.2], 180, 360, fill=hair)
    elif not a["Bald"]:
        d.chord([cx - fw, cy - fh - 6, cx + fw, cy - fh * 0.5], 180, 360, fill=hair)
    if not a["No_Beard"]:
        beard = tuple(int(c * 0.7) for c in hair) if not a["Bald"] else (60, 50, 45)
        d.chord([cx - fw * 0.85, cy + fh * 0.2, cx + fw * 0.85, cy + fh], 0, 180, fill=beard)
    if a["Wearing_Hat"]:
        hat = tuple(int(c) for c in rng.integers(0, 255, 3))
        d.chord([cx - fw - 12, cy - fh - 30, cx + fw + 12, cy - fh * 0.45], 180, 360, fill=hat)
        d.rectangle([cx - fw - 20, cy - fh * 0.62, cx + fw + 20, cy - fh * 0.5], fill=hat)

    eye_y, eye_dx = 112 + (cy - 122), fw * 0.42
    for sx in (-1, 1):
        ex = cx + sx * eye_dx
        d.line([ex - 9, eye_y - 10, ex + 9, eye_y - 11], fill=tuple(int(c * 0.6) for c in hair), width=3)
        d.ellipse([ex - 7, eye_y - 4, ex + 7, eye_y + 4], fill=(245, 245, 245))
        d.ellipse([ex - 3, eye_y - 3, ex + 3, eye_y + 3], fill=who.eye_rgb)
        if a["Eyeglasses"]:
            d.ellipse([ex - 12, eye_y - 9, ex + 12, eye_y + 9], outline=(15, 15, 15), width=3)
    if a["Eyeglasses"]:
        d.line([cx - eye_dx + 12, eye_y, cx + eye_dx - 12, eye_y], fill=(15, 15, 15), width=3)

    nose = tuple(int(c * 0.8) for c in skin)
    d.polygon([(cx, eye_y + 6), (cx - 6, eye_y + 26), (cx + 6, eye_y + 26)], fill=nose)
    lips = (190, 30, 50) if a["Wearing_Lipstick"] else tuple(int(c * 0.7) for c in skin)
    my, mw = eye_y + 42, fw * (0.48 if a["Smiling"] else 0.36)
    if a["Smiling"]:  # an upturned arc, with teeth when the mouth is open
        d.chord([cx - mw, my - 10, cx + mw, my + 10], 0, 180, fill=lips)
        if a["Mouth_Slightly_Open"]:
            d.chord([cx - mw + 4, my - 6, cx + mw - 4, my + 6], 0, 180, fill=(250, 250, 245))
    else:
        d.rectangle([cx - mw, my - 2, cx + mw, my + (5 if a["Mouth_Slightly_Open"] else 2)], fill=lips)
        if a["Mouth_Slightly_Open"]:
            d.rectangle([cx - mw + 3, my, cx + mw - 3, my + 3], fill=(40, 10, 15))

    # Soft light from one side and soft edges, like a photo's lighting and optics. No per-pixel noise:
    # a small D spots it long before G can make it, which stalls the demo's short run.
    side = rng.choice([-1.0, 1.0]) * np.linspace(-1.0, 1.0, WIDTH)[None, :, None]
    lit = np.asarray(img, np.float32) * (1.0 + 0.12 * side)
    img = Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.6, 1.4)))), a


def identity_of_index(index: int, seed: int) -> int:
    # CelebA has ~20 images per identity, scattered. Each block of 1000 images draws from its own 50
    # identities, so image i is the same whatever the total count.
    return 1 + (index // 1000) * 50 + int(np.random.default_rng([seed, 3, index]).integers(0, 50))


def write_celeba(output: Path, num: int, seed: int = 0, progress: bool = True, style: str = "studio") -> Path:
    """Write DIR/celeba/{img_align_celeba/, list_eval_partition.txt, list_attr_celeba.txt,
    identity_CelebA.txt}. Returns the celeba folder."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    root = Path(output) / "celeba"
    images = root / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    identities = {}
    attr_rows, part_rows, id_rows = [], [], []
    for i in tqdm(range(num), desc="drawing faces", unit="img", disable=not progress):
        name = f"{i + 1:06d}.jpg"
        ident = identity_of_index(i, seed)
        if ident not in identities:
            identities[ident] = _identity(seed, ident)
        img, attrs = draw_face(seed, i, identities[ident], style)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        atomic_write_bytes(images / name, buf.getvalue())
        attr_rows.append(name + " " + " ".join(f"{1 if attrs[n] else -1:2d}" for n in ATTRIBUTE_NAMES))
        part_rows.append(f"{name} {partition_of_index(i, num)}")
        id_rows.append(f"{name} {ident}")
    atomic_write_text(root / "list_attr_celeba.txt",
                      f"{num}\n" + " ".join(ATTRIBUTE_NAMES) + " \n" + "\n".join(attr_rows) + "\n")
    atomic_write_text(root / "list_eval_partition.txt", "\n".join(part_rows) + "\n")
    atomic_write_text(root / "identity_CelebA.txt", "\n".join(id_rows) + "\n")
    return root
