"""End-of-run pictures, as the DCGAN tutorials show them, drawn with Pillow alone (no matplotlib):

  samples/loss_curves.png   loss_d and loss_g, then D(x) and D(G(z)), against step
  samples/progress.gif      the fixed-noise grid over time
  samples/real_vs_fake.png  a grid of real images next to the latest fake grid
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLORS = {"loss_d": (31, 119, 180), "loss_g": (255, 127, 14), "d_real": (44, 160, 44), "d_fake": (214, 39, 40)}


def grid_image(images: torch.Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one RGB image, `nrow` per row with black gutters, laid out as
    torchvision's make_grid. Here rather than torchvision.utils, whose import costs every rank 160 MB."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)
    n, c, h, w = x.shape
    x = x.expand(n, 3, h, w) if c == 1 else x
    cols = min(nrow, n)
    rows = -(-n // cols)
    canvas = torch.zeros(3, rows * (h + padding) + padding, cols * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        canvas[:, top:top + h, left:left + w] = x[i]
    return Image.fromarray(canvas.permute(1, 2, 0).contiguous().numpy())


def _panel(rows: list[dict], keys: tuple, size=(640, 260)) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 50, 10, w - 10, h - 25
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    steps = [r["step"] for r in rows]
    vals = [r[k] for r in rows for k in keys]
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1.0
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step, v):
        return (left + (step - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))

    for k in keys:
        pts = [xy(r["step"], r[k]) for r in rows]
        if len(pts) > 1:
            d.line(pts, fill=COLORS[k], width=2)
        else:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=COLORS[k])
    for i, k in enumerate(keys):
        d.text((left + 8 + 90 * i, top + 4), k, fill=COLORS[k])
    d.text((4, top), f"{hi:.2f}", fill=(0, 0, 0))
    d.text((4, bottom - 10), f"{lo:.2f}", fill=(0, 0, 0))
    d.text((left, bottom + 6), f"step {s0}", fill=(0, 0, 0))
    d.text((right - 80, bottom + 6), f"step {s1}", fill=(0, 0, 0))
    return img


def loss_curves(metrics_path: Path, out: Path) -> bool:
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not rows:
        return False
    a, b = _panel(rows, ("loss_d", "loss_g")), _panel(rows, ("d_real", "d_fake"))
    img = Image.new("RGB", (a.width, a.height + b.height), "white")
    img.paste(a, (0, 0))
    img.paste(b, (0, a.height))
    img.save(out)
    return True


def progress_gif(samples: Path, out: Path) -> bool:
    frames = [Image.open(p).convert("P", palette=Image.Palette.ADAPTIVE)
              for p in sorted(samples.glob("fakes-*.png"))]
    if len(frames) < 2:
        return False
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=400, loop=0)
    return True


def real_vs_fake(samples: Path, out: Path) -> bool:
    fakes = sorted(samples.glob("fakes-*.png"))
    if not (samples / "reals.png").is_file() or not fakes:
        return False
    real, fake = Image.open(samples / "reals.png"), Image.open(fakes[-1])
    img = Image.new("RGB", (real.width + fake.width + 20, max(real.height, fake.height) + 20), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), "real", fill=(0, 0, 0))
    d.text((real.width + 24, 4), f"fake ({fakes[-1].stem})", fill=(0, 0, 0))
    img.paste(real, (0, 20))
    img.paste(fake, (real.width + 20, 20))
    img.save(out)
    return True


def write_report(run_dir: Path) -> None:
    samples = run_dir / "samples"
    try:
        loss_curves(run_dir / "metrics.jsonl", samples / "loss_curves.png")
        progress_gif(samples, samples / "progress.gif")
        real_vs_fake(samples, samples / "real_vs_fake.png")
    except Exception as exc:  # noqa: BLE001 - pictures are a courtesy; the run itself is done
        print(f"warning: could not draw the end-of-run report: {exc}", file=sys.stderr)
