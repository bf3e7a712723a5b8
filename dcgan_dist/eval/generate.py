"""Pictures from a trained generator (launch/generate.py): grids, folders of PNGs, latent interpolations and
the DCGAN paper's face arithmetic, from the sampling snapshot alone (run/snapshot.py).

Sampling uses batch statistics, as the trainer's grids do, so an image depends on the batch it is drawn
in: every batch is exactly `batch` latents, a short one filled up with a fixed reference set (seed
2**31 - 1), which also makes a single image (an arithmetic result) well defined.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from tqdm import tqdm

from dcgan_dist.data.celeba import ATTRIBUTE_NAMES
from dcgan_dist.errors import UserError
from dcgan_dist.eval.attributes import classifier_for, concept_scores, load_classifier, parse_expression
from dcgan_dist.nets.metrics import to_uint8
from dcgan_dist.nets.models import sample
from dcgan_dist.ops.amp import native_bf16
from dcgan_dist.report.plots import grid, pyplot, save_image
from dcgan_dist.run.layout import RunLayout
from dcgan_dist.run.snapshot import FILENAME, load_snapshot

REFERENCE_SEED = 2**31 - 1
WANDB_REF = re.compile(r"^wandb:(?:[\w.-]+/)?[\w.-]+/[\w.-]+:[\w.-]+$")


def resolve_snapshot(path: str | Path) -> Path:
    """A snapshot file; a checkpoint dir (its snapshot); a run dir (its best snapshot, else the latest);
    a downloaded artifact folder; or wandb:[ENTITY/]PROJECT/NAME:ALIAS, downloaded first."""
    p = Path(download_artifact(str(path)) if str(path).startswith("wandb:") else path)
    if not p.exists():
        raise UserError(f"--checkpoint '{p}': no such file or directory")
    if p.is_file():
        return p
    layout = RunLayout(p)
    for candidate in (p / FILENAME if not layout.checkpoints.is_dir() else None, layout.best / FILENAME,
                      (layout.latest_checkpoint() or layout.checkpoints) / FILENAME, layout.generator):
        if candidate is not None and candidate.is_file():
            return candidate
    raise UserError(f"--checkpoint '{p}': no {FILENAME} in it (expected a run dir, a checkpoint dir or a "
                    "snapshot file; runs save one with every checkpoint)")


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
    if host := server_unreachable():
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


def latents(num: int, nz: int, seed: int) -> torch.Tensor:
    return torch.randn(num, nz, generator=torch.Generator().manual_seed(seed))


class Renderer:
    """uint8 images (N, 3, R, R) on the CPU from latents, `batch` at a time, in bf16 where it is native."""

    def __init__(self, G: torch.nn.Module, device: torch.device, batch: int = 64):
        self.G, self.device, self.batch, self.nz = G.to(device), device, batch, G.nz
        self.reference = latents(batch, G.nz, REFERENCE_SEED)
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16) if native_bf16(device) else \
            contextlib.nullcontext()

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        out = []
        for i in tqdm(range(0, len(z), self.batch), desc="generating", unit="batch", disable=len(z) <= self.batch):
            chunk = z[i:i + self.batch]
            with self.autocast():
                images = sample(self.G, torch.cat([chunk, self.reference[len(chunk):]]).to(self.device))
            out.append(to_uint8(images[:len(chunk)]).cpu())
        return torch.cat(out)


def write_images(images_u8: torch.Tensor, output: Path) -> Path:
    """OUT.png: one grid. Anything else: a folder of PNGs named 000000.png, ... (what FID tools read)."""
    if output.suffix.lower() == ".png":
        save_image(grid(images_u8, nrow=math.ceil(math.sqrt(len(images_u8)))), output)
        return output
    if output.exists() and not output.is_dir():
        raise UserError(f"--output '{output}': exists and is not a folder (end it with .png for one grid)")
    for i, img in enumerate(tqdm(images_u8, desc="writing PNGs", unit="img", disable=len(images_u8) < 256)):
        save_image(Image.fromarray(img.permute(1, 2, 0).numpy()), output / f"{i:06d}.png")
    return output


def interpolate(render: Renderer, args) -> tuple[Path, Path]:
    """args.interpolate rows, each a slerp (the path a Gaussian prior favours) between two random latents in
    args.steps images: OUT.png (the strips) and OUT.gif (one frame per step, every path side by side)."""
    paths, steps = args.interpolate, args.steps
    a, b = latents(2 * paths, render.nz, args.seed).view(paths, 1, 2, render.nz).unbind(2)
    t = torch.linspace(0, 1, steps)[None, :, None]
    omega = torch.acos((a / a.norm(dim=-1, keepdim=True) * b / b.norm(dim=-1, keepdim=True)).sum(-1, keepdim=True)
                       .clamp(-1 + 1e-7, 1 - 1e-7))
    z = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    images = render(z.reshape(paths * steps, render.nz))              # path-major: row k holds path k
    png, gif = Path(args.output).with_suffix(".png"), Path(args.output).with_suffix(".gif")
    save_image(grid(images, nrow=steps), png)
    frames = [grid(images[torch.arange(paths) * steps + s], nrow=paths) for s in range(steps)]
    frames += frames[-2:0:-1]                                          # and back, so the loop has no jump
    save_image(frames[0], gif, save_all=True, append_images=frames[1:], duration=120, loop=0)
    return png, gif


def arithmetic(render: Renderer, args, classifier, pool: int = 1024) -> dict:
    """The paper's vector arithmetic (its figure 7): for each concept of args.arithmetic, the 3 samples of
    a random pool that the attribute classifier scores highest; their latents are averaged, and the
    averages added and subtracted as the expression says. Writes a figure of exemplars, averages and the
    result (with three neighbours, z + 0.25 noise, as the paper shows); returns the classifier's view."""
    net, resolution = classifier

    def at(images_u8: torch.Tensor) -> torch.Tensor:     # at the classifier's resolution (G's may differ)
        if images_u8.shape[-1] == resolution:
            return images_u8
        x = torch.nn.functional.interpolate(images_u8.float(), size=resolution, mode="bilinear", antialias=True)
        return x.round().clamp(0, 255).to(torch.uint8)

    z_pool = latents(pool, render.nz, args.seed)
    images = render(z_pool)
    scored, rows, z_result = at(images), [], torch.zeros(render.nz)
    for sign, concept in parse_expression(args.arithmetic):
        top = concept_scores(net, scored, concept).topk(3).indices
        mean = z_pool[top].mean(dim=0)
        z_result += sign * mean
        rows.append((sign, concept, images[top], render(mean[None])[0]))
    result = render(torch.cat([z_result[None], z_result + 0.25 * latents(3, render.nz, args.seed + 1)]))
    added = [(n, p) for sign, c, *_ in rows if sign > 0 for n, p in c]
    removed = [(n, p) for sign, c, *_ in rows if sign < 0 for n, p in c]
    logits = net(at(result[:1]))[0]
    _arithmetic_figure(rows, result, args.arithmetic, Path(args.output).with_suffix(".png"))
    return {"probabilities": {n: float(torch.sigmoid(logits[ATTRIBUTE_NAMES.index(n)])) for n, _ in added + removed},
            "added": added, "removed": removed}


def _arithmetic_figure(rows, result: torch.Tensor, expression: str, out: Path) -> None:
    cols = max(len(r[2]) for r in rows) + 2
    fig, axes = pyplot().subplots(len(rows) + 1, cols, figsize=(1.6 * cols, 1.8 * (len(rows) + 1)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    show = lambda ax, img, title: (ax.imshow(img.permute(1, 2, 0).numpy()), ax.set_title(title, fontsize=7))
    for i, (sign, concept, examples, mean_img) in enumerate(rows):
        label = ("+ " if sign > 0 else "− ") + ",".join(("" if p else "~") + n for n, p in concept)
        axes[i, 0].text(0.5, 0.5, label, ha="center", va="center", fontsize=8, wrap=True)
        for j, img in enumerate(examples):
            show(axes[i, 1 + j], img, "exemplar" if j == 0 else "")
        show(axes[i, -1], mean_img, "G(mean z)")
    axes[-1, 0].text(0.5, 0.5, "= result", ha="center", va="center", fontsize=9)
    for j, img in enumerate(result[: cols - 1]):
        show(axes[-1, 1 + j], img, "result" if j == 0 else "z + noise")
    fig.suptitle(expression, fontsize=9)
    fig.tight_layout()
    save_image(fig, out, dpi=110)


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


def classifier_from(args, meta: dict) -> tuple[torch.nn.Module, int]:
    """The attribute classifier of --attributes, else the one cached beside the snapshot's shards (trained
    there on first use), and its resolution."""
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
    render = Renderer(G, device, args.batch)
    if args.arithmetic is not None:
        parse_expression(args.arithmetic)                    # a malformed expression fails before any work
        view = arithmetic(render, args, classifier_from(args, meta))
        probs = " ".join(f"P({n})={p:.2f}" for n, p in view["probabilities"].items())
        return f"wrote {Path(args.output).with_suffix('.png')} from {path} (result: {probs})"
    if args.interpolate is not None:
        png, gif = interpolate(render, args)
        return f"wrote {png} and {gif} from {path}"
    written = write_images(render(latents(args.num, meta["nz"], args.seed)), Path(args.output))
    return f"wrote {args.num} images to {written} from {path} (step {meta['step']}, {device})"
