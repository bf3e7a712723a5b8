"""Everything a user watches: metrics.jsonl, the progress bar, sample PNGs and W&B.

Only global rank 0 does any of it; on other ranks every call is a no-op. `WandbRun` is the one route to
W&B. Nothing here may stop training: a failing W&B call is said once and W&B is off for the rest of the run.
"""
from __future__ import annotations

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
from tqdm import tqdm

from dcgan_dist.config import Config
from dcgan_dist.errors import note, rank, warn
from dcgan_dist.fsutil import atomic_write_text
from dcgan_dist.nets.metrics import REGISTRY
from dcgan_dist.redact import redact
from dcgan_dist.report.plots import grid, save_image
from dcgan_dist.run.layout import MARKER, STATE_FILE, RunLayout, valid_run_id
from dcgan_dist.run.snapshot import FILENAME as SNAPSHOT
from dcgan_dist.run.state import TrainerState

_USER_DATA_DIR = os.environ.get("WANDB_DATA_DIR")       # the user's choice, kept for every run of the process


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


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


def wandb_mode(cfg: Config) -> tuple[Optional[str], str]:
    """online, offline or None (disabled), and why when that is not what was asked. Decided before
    wandb.init, which would wait its whole init timeout for a server it cannot reach while the other
    ranks wait on rank 0. wandb.mode=online that cannot be is a warning; auto says why in its one line."""
    mode = cfg.wandb.mode
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        mode = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                "disabled": "disabled"}.get(env, "auto")
    if mode in ("disabled", "offline"):
        return (None if mode == "disabled" else mode), ""
    why = "" if has_wandb_credentials() else "no API key: set WANDB_API_KEY or run `wandb login` to log online"
    if not why and (host := server_unreachable()):
        why = f"the W&B server {host} does not answer"
    if why and mode == "online":
        warn(f"wandb.mode=online but {why}; logging offline instead")
        return "offline", ""
    return ("offline", why) if why else ("online", "")


def run_id_for(run_dir: str | Path, fallback: str) -> str:
    """The run_dir's W&B run id (rank 0), or `fallback` (the checkpoint's id, else a new one) written
    there. Kept in run_dir from the first start, so a job killed before its first checkpoint still logs
    to the same run when rerun."""
    path = RunLayout(run_dir).wandb_id
    kept = path.read_text().strip() if path.is_file() else None
    if kept is not None and not valid_run_id(kept):
        warn(f"{path} holds no W&B run id (expected up to 64 letters and digits); writing a new one")
        kept = None
    if kept is None:
        atomic_write_text(path, fallback + "\n")
    return kept or fallback


def _init_kwargs(cfg: Config, run_id: str, mode: str) -> dict:
    """wandb.init's arguments. A key left null is left out, so that its WANDB_* variable decides as
    wandb.init would have it; a key given beats the variable."""
    import wandb

    w, env = cfg.wandb, os.environ.get
    # wandb writes its run file every 15 s by default: a kill -9 loses that much of an offline run. Every
    # 2 s costs nothing measurable; a private setting, so only where this wandb has it.
    flush = "x_transaction_log_flush_interval"
    settings = wandb.Settings(init_timeout=w.init_timeout_s, console="off", silent=True,
                              **({flush: 2.0} if flush in getattr(wandb.Settings, "model_fields", {}) else {}))
    kwargs = dict(mode=mode, dir=str(Path(cfg.run_dir).resolve()), id=run_id, resume="allow", settings=settings,
                  project=w.project or env("WANDB_PROJECT") or "dcgan-dist",
                  name=w.name or env("WANDB_NAME") or Path(cfg.run_dir).name,
                  job_type=w.job_type or env("WANDB_JOB_TYPE") or "train",
                  **{key: getattr(w, key) for key in ("entity", "group", "notes") if getattr(w, key) is not None})
    if w.tags is not None:
        kwargs["tags"] = [t.strip() for t in w.tags.split(",") if t.strip()]
    return kwargs


class WandbRun:
    """Rank 0's W&B run: the one route to W&B. Every call is guarded: the first failure is one warning
    and turns W&B off for the rest of the process (artifacts alone, for an artifact's failure)."""

    def __init__(self, run):
        self.run, self.log_artifacts = run, True

    @classmethod
    def start(cls, cfg: Config, run_id: str, config: Optional[dict] = None) -> Optional["WandbRun"]:
        """The run in wandb.mode (online falls back to offline), or None: disabled, or W&B failed."""
        mode, why = wandb_mode(cfg)
        if mode is None or rank() != 0:
            return None
        import wandb

        # Staged artifact files wait for `wandb sync` inside the run folder, not in a home directory that
        # a container may not be able to write; unless the user chose WANDB_DATA_DIR.
        os.environ["WANDB_DATA_DIR"] = _USER_DATA_DIR or str((RunLayout(cfg.run_dir).wandb / "data").resolve())
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            # W&B stores the command line, where data.shards=... may hold a credential: it sees it redacted.
            argv, sys.argv = sys.argv, [redact(a) for a in sys.argv]
            try:
                run = wandb.init(**_init_kwargs(cfg, run_id, attempt))
                if config is not None:            # as a config record, which launch/wandb_sync.py reads
                    run.config.update(config, allow_val_change=True)
                where = run.url if attempt == "online" else (f"{Path(run.dir).parent} (upload it with "
                                                             f"`python launch/wandb_sync.py {cfg.run_dir}`)")
                note(f"W&B {attempt}{f' ({why})' if attempt == 'offline' and why else ''}: {where}")
                return cls(run)
            except Exception as exc:  # noqa: BLE001 - any W&B failure must not stop training
                warn(f"W&B {attempt} start failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            finally:
                sys.argv = argv
        warn("continuing without W&B; metrics.jsonl and samples/ still record the run")
        return None

    def call(self, fn) -> None:
        if self.run is not None:
            try:
                fn(self.run)
            except Exception as exc:  # noqa: BLE001
                self.run = None
                warn(f"W&B logging failed ({type(exc).__name__}: {exc}); continuing without W&B")

    def log(self, payload: dict, step: Optional[int] = None) -> None:
        self.call(lambda run: run.log(payload, step=step))

    def artifact(self, name: str, kind: str, files: dict[str, Path], aliases: list[str], metadata: dict) -> None:
        """Log `files` ({name in the artifact: path}) as an artifact. The files are copied (staged) now,
        so a checkpoint rotated away later still uploads. A failure here turns off artifacts only."""
        if self.run is None or not self.log_artifacts:
            return
        import wandb

        try:
            art = wandb.Artifact(name, type=kind, metadata=metadata)
            for inside, path in files.items():
                art.add_file(str(path), name=inside)
            self.run.log_artifact(art, aliases=aliases)
        except Exception as exc:  # noqa: BLE001
            self.log_artifacts = False
            warn(f"W&B artifact '{name}' failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                 "no more artifacts this run (the files stay in run_dir)")

    def finish(self) -> None:
        """Never fails the run: under Slurm a `scancel --signal=TERM` reaches every process of the job,
        W&B's own service too, and finish() then raises ConnectionResetError."""
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish()
            except Exception as exc:  # noqa: BLE001
                warn(f"W&B finish failed ({type(exc).__name__}: {exc}); the run's files are kept in run_dir/wandb")


def define_metrics(run) -> None:
    """kimg, not W&B's step, on every chart's x-axis: the step's meaning changes with the world size. Each
    evaluation metric keeps its best value (lowest, or highest for precision and recall) in the summary."""
    run.define_metric("train/kimg")
    for section in ("train", "eval", "samples"):
        run.define_metric(f"{section}/*", step_metric="train/kimg")
    for metric in REGISTRY.values():
        for key in metric.keys:
            run.define_metric(f"eval/{key}", step_metric="train/kimg",
                              summary=("max" if metric.higher_is_better else "min") + ",last")


class Tracker:
    """Rank 0's sink for scalars, images, artifacts and the end-of-run pictures; `enabled` is False on the
    other ranks. `config` is what W&B records as the run's config."""

    def __init__(self, cfg: Config, state: TrainerState, config: dict, manifest_digest: str):
        self.cfg, self.run_id, self.manifest_digest = cfg, state.wandb_run_id, manifest_digest
        self.enabled, self.layout, self.bar, self.t0 = rank() == 0, RunLayout(cfg.run_dir), None, time.time()
        self.wandb = WandbRun.start(cfg, self.run_id, config) if self.enabled else None
        if self.wandb is not None:
            self.wandb.call(define_metrics)
        if self.enabled:
            self.layout.samples.mkdir(parents=True, exist_ok=True)
            self._truncate_after(state.step)
            self.metrics = open(self.layout.metrics, "a", buffering=1)     # a resumed run continues the file
            self.bar = tqdm(total=cfg.train.steps, initial=state.step, unit="step", dynamic_ncols=True,
                            desc="training", smoothing=0.05, mininterval=1.0)

    def _truncate_after(self, step: int) -> None:
        """Drop metric rows past `step`: a run killed after its last checkpoint logged steps that the resumed
        run logs again (with the same values), and each step should appear once. A torn row goes too."""
        def step_of(line: str) -> int:
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                return 1 << 62

        path = self.layout.metrics
        lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
        keep = [ln for ln in lines if ln.strip() and step_of(ln) <= step]
        if len(keep) != len(lines):
            atomic_write_text(path, "".join(keep))

    @property
    def use_wandb(self) -> bool:
        return self.wandb is not None and self.wandb.run is not None

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def scalars(self, step: int, values: dict, section: str = "train") -> None:
        """One metrics.jsonl row and one W&B log, kimg beside the values. An evaluation's row (section
        "eval") has its keys prefixed ("eval/fid") in both."""
        if not self.enabled:
            return
        row = {(k if section == "train" or k == "kimg" else f"{section}/{k}"):
               (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in values.items()}
        self.metrics.write(json.dumps({"step": step, **row, "time": round(time.time() - self.t0, 3)}) + "\n")
        if section == "train":
            self.bar.set_postfix(kimg=f"{values['kimg']:.1f}", img_s=f"{values['images_per_s']:.0f}",
                                 loss_d=f"{values['loss_d']:.3f}", loss_g=f"{values['loss_g']:.3f}", refresh=False)
        else:
            note(f"{section} at step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in values.items()
                                                          if isinstance(v, float)))
        if self.use_wandb:       # kimg is the x-axis of every chart
            self.wandb.log({("train/kimg" if k == "kimg" else k if "/" in k else f"train/{k}"): v
                            for k, v in row.items()}, step=step)

    def images(self, step: int, kimg: float, name: str, images: torch.Tensor, path: Path) -> None:
        """Save a grid of images (uint8, or in [-1, 1]) to `path` (one of self.layout's) and send it to W&B."""
        if not self.enabled:
            return
        save_image(grid(images, nrow=int(math.sqrt(len(images)) + 0.5)), path)
        if self.use_wandb:
            import wandb

            self.wandb.log({name: wandb.Image(str(path), caption=f"step {step}, {kimg:g} kimg"), "train/kimg": kimg},
                           step=step)

    def samples_table(self, step: int, kimg: float, images_u8: torch.Tensor, probabilities: torch.Tensor) -> None:
        """samples/table: one row per fixed-noise sample, its image, its three likeliest attributes and
        one probability column per attribute, so the dashboard can filter by "Smiling" or "Eyeglasses"."""
        if not self.use_wandb:
            return
        import wandb

        from dcgan_dist.data.celeba import ATTRIBUTE_NAMES

        rows = []
        for i, (img, probs) in enumerate(zip(images_u8, probabilities.tolist())):
            top = ", ".join(f"{n} {p:.2f}" for p, n in sorted(zip(probs, ATTRIBUTE_NAMES), reverse=True)[:3])
            rows.append([wandb.Image(img.permute(1, 2, 0).numpy()), i, step, kimg, top] + [round(p, 4) for p in probs])
        table = wandb.Table(columns=["image", "index", "step", "kimg", "top", *ATTRIBUTE_NAMES], data=rows)
        self.wandb.log({"samples/table": table, "train/kimg": kimg}, step=step)

    def saved(self, path: Path, state: TrainerState, best: bool, final: bool) -> None:
        """The EMA generator of checkpoint `path` as a `model` artifact when the best changes (alias best)
        and at the end (alias latest, and best if it is), with what a reader needs to trust it; every
        full checkpoint too with wandb.log_checkpoints. W&B keeps one version per distinct file, so a
        best saved at the last step is one version with both aliases."""
        aliases = (["best"] if best or (state.best or {}).get("step") == state.step else []) + \
            (["latest"] if final else []) + [f"step-{state.step}"]
        self._artifacts(path, state, aliases, best or final, self.cfg.wandb.log_checkpoints)

    def relog_best(self) -> None:
        """At every start: the best checkpoint's generator as the model artifact, again. wandb writes an
        artifact's record only once it has staged the file, so a best found shortly before a kill can be
        missing from the killed segment's run file; logging it again costs a version only where it was lost."""
        best = self.layout.best
        if not (self.use_wandb and (best / MARKER).is_file() and (best / SNAPSHOT).is_file()):
            return
        try:
            state = TrainerState.from_json((best / STATE_FILE).read_text())
        except (OSError, ValueError):
            return
        self._artifacts(best, state, ["best", f"step-{state.step}"], True, False)

    def _artifacts(self, path: Path, state: TrainerState, aliases: list[str], generator: bool, full: bool) -> None:
        if not self.use_wandb:
            return
        model = self.cfg.model
        metadata = {"step": state.step, "kimg": state.kimg, "metrics": state.last_eval, "best": state.best,
                    "run_id": self.run_id, "shards_manifest_digest": self.manifest_digest,
                    "model": {"resolution": model.resolution, "nz": model.nz, "ngf": model.ngf, "ndf": model.ndf}}
        if generator and self.cfg.wandb.log_model:
            self.wandb.artifact(f"generator-{self.run_id}", "model", {SNAPSHOT: path / SNAPSHOT}, aliases, metadata)
        if full:
            files = {str(f.relative_to(path)): f for f in sorted(path.rglob("*")) if f.is_file()}
            self.wandb.artifact(f"checkpoint-{self.run_id}", "checkpoint", files, aliases, metadata)

    def report(self, pictures: dict[str, Path]) -> None:
        """The end-of-run pictures, to W&B under report/<name>."""
        if self.use_wandb and pictures:
            import wandb

            media = lambda p: wandb.Video(str(p), format="gif") if p.suffix == ".gif" else wandb.Image(str(p))
            self.wandb.log({f"report/{name}": media(path) for name, path in pictures.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
