"""Pictures: image grids, and the end-of-run report the DCGAN tutorials show, drawn once by rank 0 after
training (a failure is a warning, never a failed run):

  samples/loss_curves.png   losses; D(x) and D(G(z)); the evaluation metrics: all against kimg
  samples/progress.gif      the fixed-noise grid (EMA generator) over time
  samples/real_vs_fake.png  real images next to the latest fixed-noise grid
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image

from dcgan_dist.errors import warn
from dcgan_dist.fsutil import atomic_write_bytes
from dcgan_dist.nets.metrics import REGISTRY, to_uint8
from dcgan_dist.run.layout import RunLayout

TRAIN_PANELS = (("loss", ("loss_d", "loss_g"), "loss (gan.loss; log scale)", True),
                ("D output", ("d_real", "d_fake"), "mean D output (sigmoid for bce, raw otherwise)", False))
LABELS = {"loss_d": "D loss", "loss_g": "G loss", "d_real": "D(x), real", "d_fake": "D(G(z)), fake"}


def grid(images: torch.Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """(N, C, H, W) images, uint8 or in [-1, 1] -> one RGB image, `nrow` per row with black gutters, laid
    out as torchvision's make_grid (whose import would cost every rank 160 MB)."""
    x = (images if images.dtype == torch.uint8 else to_uint8(images)).cpu()
    n, c, h, w = x.shape
    cols = min(nrow, n)
    canvas = torch.zeros(3, -(-n // cols) * (h + padding) + padding, cols * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        canvas[:, top:top + h, left:left + w] = x[i].expand(3, h, w)
    return Image.fromarray(canvas.permute(1, 2, 0).contiguous().numpy())


def save_image(img, path: Path, **kw) -> None:
    """A PIL image or a matplotlib figure, atomically, in the format its suffix names; `kw` goes to the
    writer (Pillow's save, or savefig)."""
    buf, kind = io.BytesIO(), Path(path).suffix[1:]
    if isinstance(img, Image.Image):
        img.save(buf, format=kind.upper(), **kw)
    else:
        img.savefig(buf, format=kind, **kw)
        pyplot().close(img)
    atomic_write_bytes(Path(path), buf.getvalue())


def pyplot():
    import matplotlib

    matplotlib.use("Agg")                      # no display on training nodes
    import matplotlib.pyplot as plt

    return plt


def read_rows(metrics_path: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of a metrics.jsonl; a line torn by a kill is skipped."""
    train, evals = [], []
    for line in metrics_path.read_text().splitlines() if metrics_path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        (evals if any(k.startswith("eval/") for k in row) else train).append(row)
    return train, evals


def loss_curves(layout: RunLayout, out: Path) -> bool:
    train, evals = read_rows(layout.metrics)
    if not train:
        return False
    panels = len(TRAIN_PANELS) + bool(evals)
    fig, axes = pyplot().subplots(panels, 1, figsize=(8, 3.0 * panels), sharex=True, constrained_layout=True)
    kimg = [r["kimg"] for r in train]
    for ax, (title, keys, ylabel, log) in zip(axes, TRAIN_PANELS):
        for k in keys:
            ax.plot(kimg, [r[k] for r in train], label=LABELS[k])
        ax.set(title=title, ylabel=ylabel)
        if log and all(r[k] > 0 for r in train for k in keys):
            ax.set_yscale("log")
        if not log and all(0 <= r[k] <= 1 for r in train for k in keys):
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    if evals:
        _eval_panel(axes[-1], evals)
    axes[-1].set_xlabel("kimg (thousands of real images seen, all ranks)")
    save_image(fig, out, dpi=100)
    return True


def _eval_panel(ax, evals: list[dict]) -> None:
    """FID and SWD on a log axis; KID, on a different scale, on its own axis at the right; precision
    and recall, in [0, 1] and higher is better, dashed on a third. Each series its own colour."""
    def series(axis: str) -> list[tuple[str, str]]:       # (key, label) that every evaluation row has
        return [(f"eval/{k}", m.label if m.headline else k) for m in REGISTRY.values() if m.axis == axis
                for k in ([m.name] if m.headline else m.keys) if all(f"eval/{k}" in r for r in evals)]

    kimg, left = [r["kimg"] for r in evals], series("log")
    handles = [ax.plot(kimg, [r[k] for r in evals], style, color=f"C{i}", label=label)[0]
               for i, ((k, label), style) in enumerate(zip(left, ("o-", "s-", "D-", "v-")))]
    ax.set(title="quality of the EMA generator (lower is better, but precision and recall)",
           ylabel="FID, SWD x1e3 (log scale)", yscale="log")
    ax.grid(alpha=0.3)
    extra = 0
    for axis, ylabel in (("right", "KID"), ("unit", "precision, recall")):
        if not (found := series(axis)):
            continue
        other = ax.twinx()
        other.set_ylabel(ylabel)
        if extra:                           # a second axis at the right, beside KID's
            other.spines["right"].set_position(("axes", 1.12))
        if axis == "unit":
            other.set_ylim(0, 1)
        extra += 1
        for (k, label), style in zip(found, ("^--", "x:", "+:")):
            handles += other.plot(kimg, [r[k] for r in evals], style, color=f"C{len(handles)}", label=label)
    ax.legend(handles=handles, loc="best")


def progress_gif(layout: RunLayout, out: Path) -> bool:
    frames = [Image.open(p).convert("P", palette=Image.Palette.ADAPTIVE)
              for p in sorted(layout.samples.glob("fakes-*.png"))]
    if len(frames) < 2:
        return False
    save_image(frames[0], out, save_all=True, append_images=frames[1:], duration=400, loop=0)
    return True


def real_vs_fake(layout: RunLayout, out: Path) -> bool:
    fakes = sorted(layout.samples.glob("fakes-*.png"))
    if not layout.reals.is_file() or not fakes:
        return False
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 6.3), constrained_layout=True)
    step = int(fakes[-1].stem.split("-")[-1])
    for ax, path, title in ((axes[0], layout.reals, "real images"),
                            (axes[1], fakes[-1], f"generated (EMA generator, step {step})")):
        ax.imshow(Image.open(path))
        ax.set_title(title)
        ax.axis("off")
    save_image(fig, out, dpi=100)
    return True


def write_report(run_dir: Path) -> dict[str, Path]:
    """Draw what can be drawn; returns {name: path} of the pictures written."""
    layout, written = RunLayout(run_dir), {}
    for name, draw, out in (("loss_curves", loss_curves, "loss_curves.png"), ("progress", progress_gif, "progress.gif"),
                            ("real_vs_fake", real_vs_fake, "real_vs_fake.png")):
        try:
            if draw(layout, layout.samples / out):
                written[name] = layout.samples / out
        except Exception as exc:  # noqa: BLE001 - pictures are a courtesy; the run itself is done
            warn(f"could not draw {out}: {type(exc).__name__}: {exc}")
    return written
