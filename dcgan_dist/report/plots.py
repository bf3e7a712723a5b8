"""End-of-run pictures, as the DCGAN tutorials show them, drawn with matplotlib:

  samples/loss_curves.png   losses; D(x) and D(G(z)); FID, KID and SWD: all against kimg
  samples/progress.gif      the fixed-noise grid (EMA generator) over time
  samples/real_vs_fake.png  real images next to the latest fixed-noise grid

Everything here runs once, on rank 0, after training: a failure is a warning, never a failed run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image

from dcgan_dist.errors import warn
from dcgan_dist.nets.metrics import REGISTRY, to_uint8
from dcgan_dist.run.layout import RunLayout

TRAIN_PANELS = (("loss", ("loss_d", "loss_g"), "loss (gan.loss; log scale)", True),
                ("D output", ("d_real", "d_fake"), "mean D output (sigmoid for bce, raw otherwise)", False))
LABELS = {"loss_d": "D loss", "loss_g": "G loss", "d_real": "D(x), real", "d_fake": "D(G(z)), fake"}


def grid_image(images: torch.Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one RGB image, `nrow` per row with black gutters, laid out as
    torchvision's make_grid. Here rather than torchvision.utils, whose import costs every rank 160 MB."""
    return grid_u8(to_uint8(images).cpu(), nrow, padding)


def grid_u8(x: torch.Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """grid_image for uint8 images (N, C, H, W) already on the CPU."""
    n, c, h, w = x.shape
    x = x.expand(n, 3, h, w) if c == 1 else x
    cols = min(nrow, n)
    rows = -(-n // cols)
    canvas = torch.zeros(3, rows * (h + padding) + padding, cols * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        canvas[:, top:top + h, left:left + w] = x[i]
    return Image.fromarray(canvas.permute(1, 2, 0).contiguous().numpy())


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


def loss_curves(metrics_path: Path, out: Path) -> bool:
    train, evals = read_rows(metrics_path)
    if not train:
        return False
    plt = pyplot()
    panels = len(TRAIN_PANELS) + bool(evals)
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.0 * panels), sharex=True, constrained_layout=True)
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
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def _eval_series(evals: list[dict], axis: str) -> list[tuple[str, str]]:
    """(key, label) of the registry's series on plot axis `axis` that every evaluation row has."""
    out = []
    for metric in REGISTRY.values():
        keys = [metric.name] if metric.headline else list(metric.keys)
        out += [(f"eval/{k}", metric.label if metric.headline else k) for k in keys
                if metric.axis == axis and all(f"eval/{k}" in r for r in evals)]
    return out


def _eval_panel(ax, evals: list[dict]) -> None:
    """FID and SWD on a log axis; KID, on a different scale, on its own axis at the right; precision
    and recall, in [0, 1] and higher is better, dashed on a third."""
    kimg = [r["kimg"] for r in evals]
    left = _eval_series(evals, "log")
    for i, ((k, label), style) in enumerate(zip(left, ("o-", "s-", "D-", "v-"))):
        ax.plot(kimg, [r[k] for r in evals], style, color=f"C{i}", label=label)
    colour = len(left)                     # every series its own colour, across the axes
    ax.set(title="quality of the EMA generator (lower is better, but precision and recall)",
           ylabel="FID, SWD x1e3 (log scale)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    extra = 0
    for axis, ylabel in (("right", "KID"), ("unit", "precision, recall")):
        series = _eval_series(evals, axis)
        if not series:
            continue
        other = ax.twinx()
        if extra:                           # a second axis at the right, beside KID's
            other.spines["right"].set_position(("axes", 1.12))
        if axis == "unit":
            other.set_ylim(0, 1)
        extra += 1
        for (k, label), style in zip(series, ("^--", "x:", "+:")):
            other.plot(kimg, [r[k] for r in evals], style, color=f"C{colour}", label=label)
            colour += 1
        other.set_ylabel(ylabel)
        h, lab = other.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax.legend(handles, labels, loc="best")


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
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.3), constrained_layout=True)
    step = int(fakes[-1].stem.split("-")[-1])
    for ax, path, title in ((axes[0], samples / "reals.png", "real images"),
                            (axes[1], fakes[-1], f"generated (EMA generator, step {step})")):
        ax.imshow(Image.open(path))
        ax.set_title(title)
        ax.axis("off")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def write_report(run_dir: Path) -> dict[str, Path]:
    """Draw what can be drawn; returns {name: path} of the pictures written."""
    layout = RunLayout.of(run_dir)
    pictures = {"loss_curves": (loss_curves, layout.metrics, layout.samples / "loss_curves.png"),
                "progress": (progress_gif, layout.samples, layout.samples / "progress.gif"),
                "real_vs_fake": (real_vs_fake, layout.samples, layout.samples / "real_vs_fake.png")}
    written = {}
    for name, (draw, source, out) in pictures.items():
        tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")     # the suffix tells the writers the format
        try:
            if draw(source, tmp):
                os.replace(tmp, out)
                written[name] = out
        except Exception as exc:  # noqa: BLE001 - pictures are a courtesy; the run itself is done
            warn(f"could not draw {out.name}: {type(exc).__name__}: {exc}")
    return written
