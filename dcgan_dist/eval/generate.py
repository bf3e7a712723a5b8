"""Pictures from a trained generator: grids, folders of PNGs, latent interpolations and the DCGAN paper's
face arithmetic. Plain torch: loads the sampling snapshot (snapshot.py), never the trainer.

Sampling uses batch statistics, as the trainer's sample grids do, so an image depends on the batch it is
drawn in. Every batch is therefore exactly `batch` latents: a short one is filled up with a fixed
reference set (latents from seed 2**31 - 1), which also makes a single image (an arithmetic result)
well defined. The same seed gives the same images on the same device.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dcgan_dist.errors import UserError
from dcgan_dist.fsutil import atomic_write_bytes
from dcgan_dist.nets.metrics import to_uint8
from dcgan_dist.nets.models import sample
from dcgan_dist.ops.amp import native_bf16
from dcgan_dist.report.plots import grid_u8
from dcgan_dist.run.layout import RunLayout
from dcgan_dist.run.snapshot import FILENAME, load_snapshot

REFERENCE_SEED = 2**31 - 1


def resolve_snapshot(path: str | Path) -> Path:
    """A snapshot file; a checkpoint dir (its snapshot); a run dir (its best snapshot, else the latest);
    a downloaded artifact folder; or wandb:[ENTITY/]PROJECT/NAME:ALIAS, downloaded first."""
    if str(path).startswith("wandb:"):
        path = download_artifact(str(path))
    p = Path(path)
    if not p.exists():
        raise UserError(f"--checkpoint '{p}': no such file or directory")
    if p.is_file():
        return p
    layout = RunLayout.of(p)
    for candidate in (p / FILENAME if not layout.checkpoints.is_dir() else None, layout.best / FILENAME,
                      (layout.latest_checkpoint() or layout.checkpoints) / FILENAME, layout.generator):
        if candidate is not None and candidate.is_file():
            return candidate
    raise UserError(f"--checkpoint '{p}': no {FILENAME} in it (expected a run dir, a checkpoint dir or a "
                    "snapshot file; runs save one with every checkpoint)")


WANDB_REF = re.compile(r"^wandb:(?:[\w.-]+/)?[\w.-]+/[\w.-]+:[\w.-]+$")


def download_artifact(ref: str) -> Path:
    """The folder a model artifact (as the trainer logs it: generator-RUNID, aliases best and latest)
    is downloaded to: WANDB_ARTIFACT_DIR (default ./artifacts)/NAME:ALIAS, as wandb lays it out."""
    from dcgan_dist.report.track import has_wandb_credentials, server_unreachable

    if not WANDB_REF.match(ref):
        raise UserError(f"--checkpoint '{ref}': expected wandb:[ENTITY/]PROJECT/NAME:ALIAS, e.g. "
                        "wandb:me/dcgan-dist/generator-1a2b3c4d:best")
    if not has_wandb_credentials():
        raise UserError(f"--checkpoint '{ref}': fetching a W&B artifact needs an API key (WANDB_API_KEY or "
                        "`wandb login`); or pass the folder it was downloaded to")
    host = server_unreachable()
    if host:
        raise UserError(f"--checkpoint '{ref}': the W&B server {host} does not answer; or pass the folder it "
                        "was downloaded to")
    import wandb

    name = ref[len("wandb:"):]
    try:
        artifact = wandb.Api(timeout=30).artifact(name, type="model")
        return Path(artifact.download(root=str(Path(os.environ.get("WANDB_ARTIFACT_DIR", "artifacts"))
                                              / name.rsplit("/", 1)[-1])))
    except Exception as exc:  # noqa: BLE001 - wandb raises many kinds; each is the same error here
        raise UserError(f"--checkpoint '{ref}': cannot fetch it from W&B ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})") from None


class Renderer:
    """uint8 images (N, 3, R, R) on the CPU from latents, `batch` at a time."""

    def __init__(self, G: torch.nn.Module, device: torch.device, batch: int = 64, progress: bool = False):
        self.G, self.device, self.batch, self.progress = G.to(device), device, batch, progress
        self.bf16 = native_bf16(device)
        self.reference = torch.randn(batch, G.nz, generator=torch.Generator().manual_seed(REFERENCE_SEED))

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        out = []
        bar = tqdm(total=len(z), desc="generating", unit="img", disable=not self.progress or len(z) <= self.batch)
        for i in range(0, len(z), self.batch):
            chunk = z[i:i + self.batch]
            full = torch.cat([chunk, self.reference[len(chunk):]]) if len(chunk) < self.batch else chunk
            autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                        else contextlib.nullcontext())
            with autocast:
                images = sample(self.G, full.to(self.device))
            out.append(to_uint8(images[:len(chunk)]).cpu())
            bar.update(len(chunk))
        bar.close()
        return torch.cat(out)


def latents(num: int, nz: int, seed: int) -> torch.Tensor:
    return torch.randn(num, nz, generator=torch.Generator().manual_seed(seed))


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b at fractions t (the path a Gaussian prior favours)."""
    a_n, b_n = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def save_image(img: Image.Image, path: Path, **kw) -> None:
    """Atomically, in the format its suffix names (.png, .gif); `kw` goes to Pillow's save."""
    import io

    buf = io.BytesIO()
    img.save(buf, format=Path(path).suffix[1:].upper(), **kw)
    atomic_write_bytes(Path(path), buf.getvalue())


def write_images(images_u8: torch.Tensor, output: Path) -> Path:
    """OUT.png: one grid. Anything else: a folder of PNGs named 000000.png, ... (what FID tools read)."""
    output = Path(output)
    if output.suffix.lower() == ".png":
        save_image(grid_u8(images_u8, nrow=int(np.ceil(np.sqrt(len(images_u8))))), output)
        return output
    if output.exists() and not output.is_dir():
        raise UserError(f"--output '{output}': exists and is not a folder (end it with .png for one grid)")
    for i, img in enumerate(tqdm(images_u8, desc="writing PNGs", unit="img", disable=len(images_u8) < 256)):
        save_image(Image.fromarray(img.permute(1, 2, 0).numpy()), output / f"{i:06d}.png")
    return output


def interpolate(render: Renderer, nz: int, paths: int, steps: int, seed: int, output: Path) -> tuple[Path, Path]:
    """`paths` rows, each a slerp between two random latents in `steps` images: OUT.png (the strips) and
    OUT.gif (one frame per step, every path side by side)."""
    ends = latents(2 * paths, nz, seed)
    t = torch.linspace(0, 1, steps)
    z = torch.cat([slerp(ends[2 * k].expand(steps, nz), ends[2 * k + 1].expand(steps, nz), t[:, None])
                   for k in range(paths)])
    images = render(z)                                             # path-major: row k holds path k
    png = Path(output).with_suffix(".png")
    save_image(grid_u8(images, nrow=steps), png)
    frames = [grid_u8(images[torch.arange(paths) * steps + s], nrow=paths) for s in range(steps)]
    frames += frames[-2:0:-1]                                      # and back, so the loop has no jump
    gif = png.with_suffix(".gif")
    save_image(frames[0], gif, save_all=True, append_images=frames[1:], duration=120, loop=0)
    return png, gif


def arithmetic(render: Renderer, nz: int, expression: str, classifier, seed: int, output: Path,
               pool: int = 1024, exemplars: int = 3) -> dict:
    """The paper's vector arithmetic (its figure 7): for each concept, the `exemplars` samples of a random
    pool that the attribute classifier scores highest; their latents are averaged, and the averages are
    added and subtracted as the expression says. Writes a figure of exemplars, averages and the result
    (with three neighbours, z + 0.25 noise, as the paper shows), and returns the classifier's view."""
    from dcgan_dist.eval.attributes import concept_scores, parse_expression

    terms = parse_expression(expression)
    z_pool = latents(pool, nz, seed)
    images = render(z_pool)
    net, resolution = classifier
    scored = _at(images, resolution)
    rows, z_result = [], torch.zeros(nz)
    for sign, concept in terms:
        top = concept_scores(net, scored, concept).topk(exemplars).indices
        mean = z_pool[top].mean(dim=0)
        z_result += sign * mean
        rows.append((sign, concept, images[top], render(mean[None])[0]))
    near = z_result + 0.25 * latents(3, nz, seed + 1)
    result = render(torch.cat([z_result[None], near]))
    added = [(n, p) for sign, c, *_ in rows if sign > 0 for n, p in c]
    removed = [(n, p) for sign, c, *_ in rows if sign < 0 for n, p in c]
    view = {name: float(torch.sigmoid(net(_at(result[:1], resolution))[0, _index(name)]))
            for name, _ in added + removed}
    _arithmetic_figure(rows, result, expression, output)
    return {"probabilities": view, "added": added, "removed": removed}


def _index(name: str) -> int:
    from dcgan_dist.data.celeba import ATTRIBUTE_NAMES

    return ATTRIBUTE_NAMES.index(name)


def _at(images_u8: torch.Tensor, resolution: int) -> torch.Tensor:
    """Images at the classifier's resolution (the generator's may differ)."""
    if images_u8.shape[-1] == resolution:
        return images_u8
    x = torch.nn.functional.interpolate(images_u8.float(), size=resolution, mode="bilinear", antialias=True,
                                        align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def _arithmetic_figure(rows, result: torch.Tensor, expression: str, output: Path) -> None:
    from dcgan_dist.report.plots import pyplot

    plt = pyplot()
    cols = max(len(r[2]) for r in rows) + 2
    fig, axes = plt.subplots(len(rows) + 1, cols, figsize=(1.6 * cols, 1.8 * (len(rows) + 1)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (sign, concept, examples, mean_img) in enumerate(rows):
        label = ("+ " if sign > 0 else "− ") + ",".join(("" if p else "~") + n for n, p in concept)
        axes[i, 0].text(0.5, 0.5, label, ha="center", va="center", fontsize=8, wrap=True)
        for j, img in enumerate(examples):
            axes[i, 1 + j].imshow(img.permute(1, 2, 0).numpy())
            axes[i, 1 + j].set_title("exemplar" if j == 0 else "", fontsize=7)
        axes[i, -1].imshow(mean_img.permute(1, 2, 0).numpy())
        axes[i, -1].set_title("G(mean z)", fontsize=7)
    axes[-1, 0].text(0.5, 0.5, "= result", ha="center", va="center", fontsize=9)
    for j, img in enumerate(result[: cols - 1]):
        axes[-1, 1 + j].imshow(img.permute(1, 2, 0).numpy())
        axes[-1, 1 + j].set_title("result" if j == 0 else "z + noise", fontsize=7)
    fig.suptitle(expression, fontsize=9)
    fig.tight_layout()
    out = Path(output).with_suffix(".png")
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


def pick_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}': not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device '{name}': CUDA is not available on this machine")
    return device


def classifier_from(args, meta: dict):
    from dcgan_dist.eval.attributes import classifier_for, load_classifier

    if args.attributes:
        if not Path(args.attributes).is_file():
            raise UserError(f"--attributes '{args.attributes}': no such file")
        net, info = load_classifier(Path(args.attributes))
    else:
        shards = meta.get("shards") or ""
        if not shards or not Path(shards).is_dir():
            raise UserError(f"--arithmetic: the snapshot names no shards that exist here ({shards or 'none'}); "
                            "pass --attributes FILE (made by launch/attributes.py)")
        net, info = classifier_for(Path(shards))
    return net, info["resolution"]


def run(args) -> str:
    """What launch/generate.py does, given its parsed flags. Returns a one-line summary."""
    path = resolve_snapshot(args.checkpoint)
    device = pick_device(args.device)
    G, meta = load_snapshot(path, device)
    render = Renderer(G, device, args.batch, progress=True)
    output = Path(args.output)
    if args.arithmetic is not None:
        from dcgan_dist.eval.attributes import parse_expression

        parse_expression(args.arithmetic)                    # a malformed expression fails before any work
        view = arithmetic(render, meta["nz"], args.arithmetic, classifier_from(args, meta), args.seed, output)
        probs = " ".join(f"P({n})={p:.2f}" for n, p in view["probabilities"].items())
        return f"wrote {output.with_suffix('.png')} from {path} (result: {probs})"
    if args.interpolate is not None:
        png, gif = interpolate(render, meta["nz"], args.interpolate, args.steps, args.seed, output)
        return f"wrote {png} and {gif} from {path}"
    written = write_images(render(latents(args.num, meta["nz"], args.seed)), output)
    return f"wrote {args.num} images to {written} from {path} (step {meta['step']}, {device})"
