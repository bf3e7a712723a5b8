"""Everything a user watches: metrics.jsonl, the progress bar, sample PNGs and W&B.

Only global rank 0 does any of it; on other ranks every method is a no-op. Nothing here may stop
training: a failing W&B call is reported once and W&B is switched off for the rest of the run.
"""
from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import socket
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from tqdm import tqdm

from dcgan_dist.config import Config
from dcgan_dist.errors import warn
from dcgan_dist.fsutil import atomic_write_text
from dcgan_dist.layout import RunLayout, valid_run_id
from dcgan_dist.redact import redact
from dcgan_dist.report import grid_image


_USER_DATA_DIR = os.environ.get("WANDB_DATA_DIR")       # the user's choice, kept for every run of the process


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def run_id_for(run_dir: str | Path, fallback: str) -> str:
    """The run_dir's W&B run id (rank 0), or `fallback` (the checkpoint's id, else a new one) written
    there. Kept in run_dir from the first start, so a job killed before its first checkpoint still logs
    to the same run when rerun. Older run folders have it only in their checkpoints; it is written out
    on their next start."""
    path = RunLayout.of(run_dir).wandb_id
    kept = None
    if path.is_file():
        kept = path.read_text().strip()
        if not valid_run_id(kept):
            warn(f"{path} holds no W&B run id (expected up to 64 letters and digits); writing a new one")
            kept = None
    run_id = kept or fallback
    if run_id != kept:
        atomic_write_text(path, run_id + "\n")
    return run_id


def wandb_mode(cfg: Config) -> tuple[Optional[str], str]:
    """online, offline or None (disabled), and why when that is not what was asked. Decided before
    wandb.init, which would otherwise wait its whole init timeout on a server it cannot reach while
    the other ranks wait on rank 0. A wandb.mode=online that cannot be is a warning; auto says why in
    the one line that names the run."""
    mode = cfg.wandb.mode
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        mode = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                "disabled": "disabled"}.get(env, "auto")
    if mode in ("disabled", "offline"):
        return (None if mode == "disabled" else mode), ""
    why = "no API key: set WANDB_API_KEY or run `wandb login` to log online" if not has_wandb_credentials() else ""
    if not why:
        host = server_unreachable()
        why = f"the W&B server {host} does not answer" if host else ""
    if why and mode == "online":
        warn(f"wandb.mode=online but {why}; logging offline instead")
        return "offline", ""
    return ("offline", why) if why else ("online", "")


def server_unreachable(timeout_s: float = 3.0) -> Optional[str]:
    """'host:port' of the W&B server (or of the proxy in front of it) when no TCP connection to it opens
    within timeout_s, else None. In a thread, so a resolver that hangs cannot hold the caller longer."""
    url = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    if proxy and url.scheme == "https":
        url = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    try:
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return url.netloc
    answered = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return None if answered else f"{host}:{port}"


def init_kwargs(cfg: Config, run_id: str, mode: str) -> tuple[str, dict]:
    """The project and wandb.init's arguments. A key left null is left out, so that its WANDB_* variable
    decides as wandb.init would have it; a key given beats the variable."""
    import wandb

    w, env = cfg.wandb, os.environ.get
    kwargs = dict(mode=mode, dir=str(Path(cfg.run_dir).resolve()), id=run_id, resume="allow",
                  name=w.name or env("WANDB_NAME") or Path(cfg.run_dir).name,
                  job_type=w.job_type or env("WANDB_JOB_TYPE") or "train",
                  # Never prompt, never wait long for a network that is not there.
                  settings=wandb.Settings(init_timeout=w.init_timeout_s, console="off", silent=True, **_flush_often()))
    for key in ("entity", "group", "notes"):
        if getattr(w, key) is not None:
            kwargs[key] = getattr(w, key)
    if w.tags is not None:
        kwargs["tags"] = [t.strip() for t in w.tags.split(",") if t.strip()]
    return w.project or env("WANDB_PROJECT") or "dcgan-dist", kwargs


def _flush_often() -> dict:
    """wandb holds a run's records in memory and writes them to its .wandb file every 15 s by default:
    a kill -9 (a lost machine, the OOM killer) loses that much of an offline run. Every 2 s costs
    nothing measurable. A private setting, so only where this wandb has it."""
    import wandb

    key = "x_transaction_log_flush_interval"
    return {key: 2.0} if key in getattr(wandb.Settings, "model_fields", {}) else {}


def start_wandb(accelerator: Accelerator, cfg: Config, run_id: str, config_dict: dict) -> Optional[str]:
    """Start the W&B run on rank 0 through Accelerate's tracker. Returns the mode it ended up in."""
    if not accelerator.is_main_process:
        return None
    mode, why = wandb_mode(cfg)
    if mode is None:
        return None
    stage_in_run_dir(cfg.run_dir)
    for attempt in (mode, "offline") if mode == "online" else (mode,):
        project, kwargs = init_kwargs(cfg, run_id, attempt)
        try:
            with redacted_argv():
                accelerator.init_trackers(project, config=config_dict, init_kwargs={"wandb": kwargs})
            run = accelerator.get_tracker("wandb", unwrap=True)
            define_metrics(run, cfg)
            where = run.url if attempt == "online" else (f"{Path(run.dir).parent} (upload it with "
                                                         f"`python launch/wandb_sync.py {cfg.run_dir}`)")
            why = f" ({why})" if attempt == "offline" and why else ""
            print(f"dcgan-dist: W&B {attempt}{why}: {where}", file=sys.stderr, flush=True)
            return attempt
        except Exception as exc:  # noqa: BLE001 - any W&B failure must not stop training
            accelerator.trackers = []
            warn(f"W&B {attempt} start failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    warn("continuing without W&B; metrics.jsonl and samples/ still record the run")
    return None


def stage_in_run_dir(run_dir: str | Path) -> None:
    """Staged artifact files wait for `wandb sync` inside the run folder, not in a home directory that a
    container may not be able to write; unless the user chose WANDB_DATA_DIR."""
    os.environ["WANDB_DATA_DIR"] = _USER_DATA_DIR or str((RunLayout.of(run_dir).wandb / "data").resolve())


@contextlib.contextmanager
def redacted_argv():
    """W&B stores the command line (sys.argv) in the run's metadata; a data.shards=... or --shards there
    may hold a credential, so it is shown the redacted one while a run starts."""
    argv, sys.argv = sys.argv, [redact(a) for a in sys.argv]
    try:
        yield
    finally:
        sys.argv = argv


def define_metrics(run, cfg: Config) -> None:
    """kimg, not W&B's step, on every chart's x-axis: the step's meaning changes with the world size. Each
    evaluation metric also keeps its best value (lowest, or highest for precision and recall) in the run
    summary."""
    from dcgan_dist.metrics import REGISTRY

    run.define_metric("train/kimg")
    for section in ("train", "eval", "samples"):
        run.define_metric(f"{section}/*", step_metric="train/kimg")
    for metric in REGISTRY.values():
        for key in metric.keys:
            run.define_metric(f"eval/{key}", step_metric="train/kimg",
                              summary=("max" if metric.higher_is_better else "min") + ",last")


def _truncate_after(path: Path, step: int) -> None:
    """Drop metric lines past `step`: a run killed after its last checkpoint logged steps that the
    resumed run will log again (with the same values), and each step should appear once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if ln.strip() and _step_of(ln) <= step]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(keep))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62            # a line torn by a kill mid-write: drop it


class Tracker:
    """Rank-0 sink for scalars and images. `enabled=False` on other ranks."""

    def __init__(self, accelerator: Accelerator, cfg: Config, start_step: int, wandb_mode: Optional[str]):
        self.acc = accelerator
        self.enabled = accelerator.is_main_process
        self.use_wandb = self.enabled and wandb_mode is not None
        self.log_artifacts = True
        self.layout = RunLayout.of(cfg.run_dir)
        self.samples_dir = self.layout.samples
        self.bar = None
        if self.enabled:
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            metrics_path = self.layout.metrics
            _truncate_after(metrics_path, start_step)
            # Append: a resumed run continues the same file.
            self.metrics = open(metrics_path, "a", buffering=1)
            self.bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc="training", smoothing=0.05, mininterval=1.0)
        self.t0 = time.time()

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"\ndcgan-dist: {message}", file=sys.stderr, flush=True)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def scalars(self, step: int, values: dict, section: str = "train") -> None:
        """One metrics.jsonl row and one W&B log. A training row (section "train") has the loss keys;
        any other section's row (an evaluation: section "eval", {"fid": ...}) is stored with its keys
        prefixed ("eval/fid"), beside "kimg", and can hold any keys at all."""
        if not self.enabled:
            return
        rounded = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in values.items()}
        if section != "train":
            rounded = {(k if k == "kimg" else f"{section}/{k}"): v for k, v in rounded.items()}
        row = {"step": step, **rounded, "time": round(time.time() - self.t0, 3)}
        self.metrics.write(json.dumps(row) + "\n")
        if section == "train":
            self.bar.set_postfix(kimg=f"{values['kimg']:.1f}", img_s=f"{values['images_per_s']:.0f}",
                                 loss_d=f"{values['loss_d']:.3f}", loss_g=f"{values['loss_g']:.3f}", refresh=False)
        else:
            self.note(f"{section} at step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in values.items()
                                                                if isinstance(v, float)))
        logged = {(k if "/" in k else f"{section}/{k}"): v for k, v in
                  (values.items() if section == "train" else rounded.items())}
        logged["train/kimg"] = logged.pop(f"{section}/kimg")      # the x-axis of every chart
        self._wandb(lambda: self.acc.log(logged, step=step))

    def images(self, step: int, kimg: float, name: str, images: torch.Tensor, path: Path) -> Optional[Path]:
        """Save a grid of images in [-1, 1] to `path` (one of self.layout's) and send it to W&B."""
        if not self.enabled:
            return None
        grid = grid_image(images, nrow=int(math.sqrt(len(images)) + 0.5))
        tmp = path.with_name(f".{path.name}.tmp.png")
        grid.save(tmp, format="PNG")
        os.replace(tmp, path)
        if self.use_wandb:
            import wandb

            self._wandb(lambda: self._run().log(
                {name: wandb.Image(str(path), caption=f"step {step}, {kimg:g} kimg"), "train/kimg": kimg}, step=step))
        return path

    def samples_table(self, step: int, kimg: float, images_u8: torch.Tensor, probabilities: torch.Tensor,
                      attribute_names: list[str]) -> None:
        """samples/table: one row per fixed-noise sample, its image, its three likeliest attributes and
        one probability column per attribute, so the dashboard can filter by "Smiling" or "Eyeglasses"."""
        if not self.use_wandb:
            return
        import wandb

        columns = ["image", "index", "step", "kimg", "top"] + list(attribute_names)
        rows = []
        for i, (img, probs) in enumerate(zip(images_u8, probabilities.tolist())):
            top = sorted(zip(probs, attribute_names), reverse=True)[:3]
            rows.append([wandb.Image(img.permute(1, 2, 0).numpy()), i, step, kimg,
                         ", ".join(f"{n} {p:.2f}" for p, n in top)] + [round(p, 4) for p in probs])
        self._wandb(lambda: self._run().log({"samples/table": wandb.Table(columns=columns, data=rows),
                                             "train/kimg": kimg}, step=step))

    def artifact(self, name: str, kind: str, files: dict[str, Path], aliases: list[str], metadata: dict) -> None:
        """Log `files` ({name in the artifact: path}) as a W&B artifact. The files are copied (staged)
        now, so a checkpoint rotated away later still uploads. A failure here turns off artifacts only."""
        if not (self.use_wandb and self.log_artifacts):
            return
        import wandb

        try:
            art = wandb.Artifact(name, type=kind, metadata=metadata)
            for inside, path in files.items():
                art.add_file(str(path), name=inside)
            self._run().log_artifact(art, aliases=aliases)
        except Exception as exc:  # noqa: BLE001
            self.log_artifacts = False
            warn(f"W&B artifact '{name}' failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                 "no more artifacts this run (the files stay in run_dir)")

    def _run(self):
        return self.acc.get_tracker("wandb", unwrap=True)

    def report(self, pictures: dict[str, Path]) -> None:
        """The end-of-run pictures, to W&B under report/<name>."""
        if not (self.use_wandb and pictures):
            return
        import wandb

        def media(path: Path):
            return wandb.Video(str(path), format="gif") if path.suffix == ".gif" else wandb.Image(str(path))

        self._wandb(lambda: self._run().log({f"report/{name}": media(path) for name, path in pictures.items()}))

    def _wandb(self, call) -> None:
        if not self.use_wandb:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001
            self.use_wandb = False
            warn(f"W&B logging failed ({type(exc).__name__}: {exc}); continuing without W&B")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            self.metrics.close()
