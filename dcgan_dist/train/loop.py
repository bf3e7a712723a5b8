"""The training loop, as a recipe: preflight, build, resume, then D step + G step until `train.steps`.

Progress is counted in optimizer steps (one D step + one G step) and kimg (thousands of real images
seen across all ranks), never epochs: every rank draws from an infinite stream, so all ranks run the
same number of steps and DDP cannot hang on a short rank.

Everything a resumed run needs to continue exactly is a function of the step: the checkpoint holds the
weights, optimizer and scaler states and every rank's RNG states, and the data stream restarts at the
step (data/stream.py). A resumed run therefore logs the same losses as an uninterrupted one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from dcgan_dist import losses
from dcgan_dist.config import Config, save_config
from dcgan_dist.data.shards import read_manifest, shard_paths, verify_shards
from dcgan_dist.data.stream import make_loader, next_batch, stop_loader
from dcgan_dist.errors import RunStopped, UserError
from dcgan_dist.fsutil import probe_writable
from dcgan_dist.models import build_models
from dcgan_dist.report import write_report
from dcgan_dist.track import Tracker, start_wandb
from dcgan_dist.train import checkpoint, dist

NO_BAD_STEP = 2**62


def preflight(cfg: Config) -> dict:
    """Every user error we can see before starting a process group, as a one-line UserError."""
    manifest = read_manifest(Path(cfg.data.shards))
    if manifest["resolution"] != cfg.model.resolution:
        raise UserError(f"config key 'model.resolution' is {cfg.model.resolution} but the shards in "
                        f"'{cfg.data.shards}' are {manifest['resolution']}px; re-shard or change the key")
    if cfg.data.batch_size > manifest["count"]:
        raise UserError(f"config key 'data.batch_size' is {cfg.data.batch_size}, larger than the "
                        f"{manifest['count']} images in '{cfg.data.shards}'")
    try:
        probe_writable(Path(cfg.run_dir))
    except OSError as exc:
        raise UserError(f"config key 'run_dir': '{cfg.run_dir}' is not writable ({exc.strerror})") from None
    return manifest


def build(accelerator: Accelerator, cfg: Config) -> dict:
    # Same seed on every rank so replicas start equal (DDP also broadcasts rank 0's weights).
    torch.manual_seed(cfg.seed)
    G, D = build_models(cfg.model.nz, cfg.model.ngf, cfg.model.ndf, cfg.model.resolution)
    if cfg.train.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.optim.lr, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr, betas=betas)
    G, D, opt_g, opt_d = accelerator.prepare(G, D, opt_g, opt_d)
    return {"G": G, "D": D, "opt_g": opt_g, "opt_d": opt_d}


def _apply_optim_config(nets: dict, cfg: Config) -> None:
    """The config, not the checkpoint, sets lr and betas: load_state restores the saved ones, which
    would silently ignore `optim.lr=...` given to a resumed run."""
    for opt in (nets["opt_g"], nets["opt_d"]):
        for group in opt.param_groups:
            group["lr"], group["betas"] = cfg.optim.lr, (cfg.optim.beta1, cfg.optim.beta2)


def _update(accelerator: Accelerator, opt, loss: torch.Tensor, guard: bool) -> bool:
    """backward + step. Returns False if the update was skipped (fp16 scaler overflow or, with
    `guard`, non-finite grads). Grads are all-reduced by then, so every rank decides alike."""
    opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if guard:
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):  # a sync, skip mode only
            opt.zero_grad(set_to_none=True)
            return False
    opt.step()
    return not opt.step_was_skipped


def train_step(accelerator: Accelerator, nets: dict, batch_u8: torch.Tensor, nz: int, channels_last: bool,
               guard: bool = False) -> tuple[torch.Tensor, bool, bool]:
    """One D step then one G step.

    Returns [loss_d, loss_g, D(x), D(G(z))] on the device (unsynced) and whether each update applied.
    """
    G, D, opt_g, opt_d = nets["G"], nets["D"], nets["opt_g"], nets["opt_d"]
    D_local = accelerator.unwrap_model(D)
    device = accelerator.device
    real = batch_u8.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)   # uint8 -> [-1, 1]
    # The loader's batches are channels_last already; this copies only when the models are not.
    real = real.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    z = torch.randn(real.shape[0], nz, device=device)

    # D phase. G's forward keeps its graph: the G phase reuses `fake` (as the paper's code does).
    fake = G(z)
    real_logits, fake_logits = D(real), D(fake.detach())     # two passes: BN stats stay per batch
    loss_d = losses.d_loss(real_logits, fake_logits)
    applied_d = _update(accelerator, opt_d, loss_d, guard)

    # G phase, through the unwrapped D with its grads off: no D grads are computed or all-reduced.
    D_local.requires_grad_(False)
    loss_g = losses.g_loss(D_local(fake))
    applied_g = _update(accelerator, opt_g, loss_g, guard)
    D_local.requires_grad_(True)
    stats = torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(real_logits.detach()).mean(),
                         torch.sigmoid(fake_logits.detach()).mean()])
    return stats, applied_d, applied_g


@torch.no_grad()
def sample(G_local: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """G(z) with batch statistics, as in training, leaving G's BN running stats untouched."""
    saved = [b.clone() for b in G_local.buffers()]
    out = G_local(z)
    for b, s in zip(G_local.buffers(), saved):
        b.copy_(s)
    return out


@dataclass
class Counters:
    """Run totals that go into every metrics line and every checkpoint."""

    skipped_d: int = 0               # D updates skipped: fp16 scaler overflow or non-finite grads
    skipped_g: int = 0
    consecutive_skips: int = 0
    data_errors: int = 0             # unreadable samples or shard errors met by this rank's loader

    def as_dict(self, accelerator: Accelerator) -> dict:
        """Collective: data_errors is summed over ranks (skips agree on every rank already)."""
        errors = torch.tensor([float(self.data_errors)], device=accelerator.device)
        total = int(accelerator.reduce(errors, reduction="sum").item())
        return {"skipped_d": self.skipped_d, "skipped_g": self.skipped_g, "data_errors": total}


def train(cfg: Config) -> None:
    manifest = preflight(cfg)
    accelerator = dist.build_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        verify_shards(Path(cfg.data.shards), manifest)
    nets = build(accelerator, cfg)
    set_seed(cfg.seed + rank)                          # per-rank noise; a resume restores the saved states
    resumed_from, trainer_state = checkpoint.resume(accelerator, cfg.run_dir)
    _apply_optim_config(nets, cfg)
    trainer_state = trainer_state or {"step": 0, "wandb_run_id": _new_run_id()}
    start_step = trainer_state["step"]

    global_batch = cfg.data.batch_size * world
    workers = dist.loader_workers(cfg.data.num_workers, accelerator.device)
    run_facts = {"world_size": world, "global_batch": global_batch, "mixed_precision": accelerator.mixed_precision,
                 "num_workers": workers, "dataset_count": manifest["count"]}
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.run_dir) / "config.yaml", extra=run_facts)
        print(f"dcgan-dist: {dist.describe(accelerator, cfg.data.batch_size)} images={manifest['count']} "
              f"steps={cfg.train.steps} " + (f"resuming from {resumed_from}" if resumed_from else "fresh start"),
              flush=True)
    wandb_mode = start_wandb(accelerator, cfg, trainer_state["wandb_run_id"], {**cfg.to_dict(), **run_facts})
    tracker = Tracker(accelerator, cfg, start_step, wandb_mode)
    loader = make_loader(shard_paths(cfg.data.shards, manifest), cfg.data.batch_size, cfg.model.resolution,
                         cfg.seed, rank, world, workers, cfg.data.shuffle_buffer, start_step,
                         pin_memory=accelerator.device.type == "cuda")
    run = {"batches": iter(loader), "stop": dist.StopRequest(accelerator)}
    clean = False
    try:
        _loop(accelerator, cfg, nets, run, tracker, trainer_state, global_batch)
        clean = True
    finally:
        run["stop"].close(wait=clean)
        tracker.close()
        stop_loader(run["batches"])
        run.clear()
        del loader
        dist.shutdown(accelerator, [nets], clean=clean)
    if accelerator.is_main_process:
        write_report(Path(cfg.run_dir))


def _loop(accelerator, cfg, nets, run, tracker, trainer_state, global_batch):
    G_local, D_local = accelerator.unwrap_model(nets["G"]), accelerator.unwrap_model(nets["D"])
    device = accelerator.device
    # Rank 0 carries the run's data_errors total from the checkpoint; the others count from zero.
    counters = Counters(skipped_d=trainer_state.get("skipped_d", 0), skipped_g=trainer_state.get("skipped_g", 0),
                        data_errors=trainer_state.get("data_errors", 0) if accelerator.is_main_process else 0)
    fixed_z = torch.randn(cfg.train.num_samples, cfg.model.nz,
                          generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    stats = torch.zeros(4, device=device)
    # The first step with a non-finite loss, tracked on the device so that no step waits for the host.
    bad_step = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)
    step_on_device = torch.full((), trainer_state["step"], dtype=torch.int64, device=device)
    start = trainer_state["step"]
    interval = {"t": time.time(), "step": start, "n": 0}
    guard = cfg.train.nonfinite == "skip" and accelerator.scaler is None

    def save(done: int) -> None:
        _check_finite(accelerator, bad_step, stats, interval["n"], cfg.run_dir)
        replicas = dist.check_replicas(accelerator, {"G": G_local, "D": D_local})
        trainer_state.update(step=done, kimg=done * global_batch / 1000, world_size=accelerator.num_processes,
                             **counters.as_dict(accelerator))
        checkpoint.save(accelerator, cfg.run_dir, done, trainer_state, replicas, cfg.train.keep_ckpts)

    if start >= cfg.train.steps:
        tracker.note(f"already at step {start} of train.steps={cfg.train.steps}; raise it to train longer")
    for step in range(start, cfg.train.steps):
        if run["stop"].poll():
            if step != start and step % cfg.train.ckpt_every != 0:
                save(step)
            tracker.note(f"stopped by signal at step {step}; rerun the same command to resume")
            return
        batch, data_errors = next_batch(run["batches"])
        counters.data_errors += data_errors
        if step == 0:
            tracker.images(0, "samples/real", batch[: cfg.train.num_samples].float() / 127.5 - 1, "reals.png")
            tracker.images(0, "samples/fake", sample(G_local, fixed_z), f"fakes-{0:08d}.png")
        step_stats, applied_d, applied_g = train_step(accelerator, nets, batch, cfg.model.nz,
                                                      cfg.train.channels_last, guard)
        _count_skips(counters, applied_d, applied_g, step + 1, cfg.train.max_consecutive_skips)
        step_on_device += 1
        finite = torch.isfinite(step_stats[:2]).all()
        if guard:       # skipped steps are counted instead; keep them out of the logged means
            stats += torch.where(finite, step_stats, torch.zeros_like(step_stats))
        else:
            bad_step = torch.where(finite, bad_step, torch.minimum(bad_step, step_on_device))
            stats += step_stats
        interval["n"] += 1
        done = step + 1
        tracker.step()
        last = done == cfg.train.steps
        if done % cfg.train.log_every == 0 or last:
            _log(accelerator, cfg, tracker, stats, bad_step, interval, counters, done, global_batch)
        if done % cfg.train.sample_every == 0 or last:
            tracker.images(done, "samples/fake", sample(G_local, fixed_z), f"fakes-{done:08d}.png")
        if done % cfg.train.ckpt_every == 0 or last:
            save(done)


def _count_skips(counters: Counters, applied_d: bool, applied_g: bool, done: int, limit: int) -> None:
    counters.skipped_d += not applied_d
    counters.skipped_g += not applied_g
    counters.consecutive_skips = 0 if (applied_d and applied_g) else counters.consecutive_skips + 1
    if counters.consecutive_skips >= limit:
        raise RunStopped(f"{limit} updates in a row skipped for non-finite values, the last at step {done}; "
                         "the run has diverged (last good checkpoint kept)")


def _check_finite(accelerator, bad_step, stats, n, run_dir) -> None:
    """Raise, naming the step, if any rank saw a non-finite loss. A sync: call at log/ckpt steps only."""
    first = dist.all_min(accelerator, bad_step)
    if first < NO_BAD_STEP:
        means = (stats / max(n, 1)).tolist()
        last_good = checkpoint.latest(run_dir, warn=False)
        raise RunStopped(f"non-finite loss at step {first} (loss_d={means[0]:.4g}, loss_g={means[1]:.4g}); "
                         f"stopping without saving. Last good checkpoint: {last_good or 'none'}")


def _log(accelerator, cfg, tracker, stats, bad_step, interval, counters, done, global_batch) -> None:
    """The only host-device sync between log intervals: one reduce and one .tolist()."""
    _check_finite(accelerator, bad_step, stats, interval["n"], cfg.run_dir)
    means = (accelerator.reduce(stats, reduction="mean") / max(interval["n"], 1)).tolist()
    now = time.time()
    values = dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), means))
    values.update(kimg=done * global_batch / 1000,
                  images_per_s=(done - interval["step"]) * global_batch / max(now - interval["t"], 1e-9),
                  **counters.as_dict(accelerator))
    tracker.scalars(done, values)
    stats.zero_()
    interval.update(t=now, step=done, n=0)


def _new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)
