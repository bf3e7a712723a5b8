"""The training loop, as a recipe: preflight, build, resume, then D step + G step until `train.steps`.

Progress is counted in optimizer steps (one D step + one G step) and kimg (thousands of real images
seen across all ranks), never epochs: every rank draws from an infinite stream, so all ranks run the
same number of steps and DDP cannot hang on a short rank.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from dcgan_dist import losses
from dcgan_dist.config import Config, save_config
from dcgan_dist.data.shards import read_manifest, shard_paths
from dcgan_dist.data.stream import make_loader
from dcgan_dist.errors import UserError
from dcgan_dist.models import build_models
from dcgan_dist.report import write_report
from dcgan_dist.track import Tracker, start_wandb
from dcgan_dist.train import checkpoint, dist


def preflight(cfg: Config) -> dict:
    """Every user error we can see before starting a process group, as a one-line UserError."""
    manifest = read_manifest(Path(cfg.data.shards))
    if manifest["resolution"] != cfg.model.resolution:
        raise UserError(f"config key 'model.resolution' is {cfg.model.resolution} but the shards in "
                        f"'{cfg.data.shards}' are {manifest['resolution']}px; re-shard or change the key")
    if cfg.data.batch_size > manifest["count"]:
        raise UserError(f"config key 'data.batch_size' is {cfg.data.batch_size}, larger than the "
                        f"{manifest['count']} images in '{cfg.data.shards}'")
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write-probe").write_bytes(b"")
        (run_dir / ".write-probe").unlink()
    except OSError as exc:
        raise UserError(f"config key 'run_dir': '{run_dir}' is not writable ({exc.strerror})") from None
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


def train_step(accelerator: Accelerator, nets: dict, batch_u8: torch.Tensor, nz: int,
               channels_last: bool) -> torch.Tensor:
    """One D step then one G step. Returns [loss_d, loss_g, D(x), D(G(z))] on the device, unsynced."""
    G, D, opt_g, opt_d = nets["G"], nets["D"], nets["opt_g"], nets["opt_d"]
    D_local = accelerator.unwrap_model(D)
    device = accelerator.device
    real = batch_u8.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)   # uint8 -> [-1, 1]
    if channels_last:
        real = real.contiguous(memory_format=torch.channels_last)
    z = torch.randn(real.shape[0], nz, device=device)

    # D phase. G's forward keeps its graph: the G phase reuses `fake` (as the paper's code does).
    fake = G(z)
    real_logits, fake_logits = D(real), D(fake.detach())     # two passes: BN stats stay per batch
    loss_d = losses.d_loss(real_logits, fake_logits)
    opt_d.zero_grad(set_to_none=True)
    accelerator.backward(loss_d)
    opt_d.step()

    # G phase, through the unwrapped D with its grads off: no D grads are computed or all-reduced.
    D_local.requires_grad_(False)
    loss_g = losses.g_loss(D_local(fake))
    opt_g.zero_grad(set_to_none=True)
    accelerator.backward(loss_g)
    opt_g.step()
    D_local.requires_grad_(True)
    return torch.stack([loss_d.detach(), loss_g.detach(),
                        torch.sigmoid(real_logits.detach()).mean(), torch.sigmoid(fake_logits.detach()).mean()])


@torch.no_grad()
def sample(G_local: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """G(z) with batch statistics, as in training, leaving G's BN running stats untouched."""
    saved = [b.clone() for b in G_local.buffers()]
    out = G_local(z)
    for b, s in zip(G_local.buffers(), saved):
        b.copy_(s)
    return out


def train(cfg: Config) -> None:
    manifest = preflight(cfg)
    accelerator = dist.build_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    nets = build(accelerator, cfg)
    set_seed(cfg.seed + rank)                          # per-rank noise; a resume restores the saved states
    start_step, trainer_state = 0, {"wandb_run_id": _new_run_id() if accelerator.is_main_process else None}
    resume_from = checkpoint.latest(cfg.run_dir, warn=accelerator.is_main_process)
    if resume_from is not None:
        trainer_state = checkpoint.load(accelerator, resume_from)
        start_step = trainer_state["step"]

    global_batch = cfg.data.batch_size * world
    run_facts = {"world_size": world, "global_batch": global_batch, "mixed_precision": accelerator.mixed_precision,
                 "dataset_count": manifest["count"]}
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.run_dir) / "config.yaml", extra=run_facts)
        print(f"dcgan-dist: {dist.describe(accelerator, cfg.data.batch_size)} "
              f"images={manifest['count']} steps={cfg.train.steps} "
              + (f"resuming from {resume_from}" if resume_from else "fresh start"), flush=True)
    wandb_mode = start_wandb(accelerator, cfg, trainer_state["wandb_run_id"], {**cfg.to_dict(), **run_facts})
    tracker = Tracker(accelerator, cfg, start_step, wandb_mode)

    loader = make_loader(shard_paths(cfg.data.shards, manifest), cfg.data.batch_size, cfg.model.resolution,
                         cfg.seed, rank, world, cfg.data.num_workers, cfg.data.shuffle_buffer, start_step,
                         pin_memory=accelerator.device.type == "cuda")
    batches = iter(loader)
    fixed_z = torch.randn(cfg.train.num_samples, cfg.model.nz,
                          generator=torch.Generator().manual_seed(cfg.seed)).to(accelerator.device)
    G_local = accelerator.unwrap_model(nets["G"])
    try:
        _loop(accelerator, cfg, nets, batches, tracker, fixed_z, start_step, trainer_state, global_batch)
    finally:
        tracker.close()
        del batches, loader, G_local
        dist.shutdown(accelerator, [nets])
    if accelerator.is_main_process:
        write_report(Path(cfg.run_dir))


def _loop(accelerator, cfg, nets, batches, tracker, fixed_z, start_step, trainer_state, global_batch):
    G_local = accelerator.unwrap_model(nets["G"])
    stats, n_stats = torch.zeros(4, device=accelerator.device), 0
    t_last, step_last = time.time(), start_step
    for step in range(start_step, cfg.train.steps):
        batch = next(batches)
        if step == start_step and start_step == 0:
            tracker.images(0, "samples/real", batch[: cfg.train.num_samples].float() / 127.5 - 1, "reals.png")
            tracker.images(0, "samples/fake", sample(G_local, fixed_z), f"fakes-{0:08d}.png")
        stats += train_step(accelerator, nets, batch, cfg.model.nz, cfg.train.channels_last)
        n_stats += 1
        done = step + 1
        tracker.step()
        last = done == cfg.train.steps
        if done % cfg.train.log_every == 0 or last:
            # The only host-device sync between log intervals: one reduce, one .tolist().
            means = (accelerator.reduce(stats, reduction="mean") / n_stats).tolist()
            now = time.time()
            values = dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), means))
            if not all(math.isfinite(v) for v in means):
                raise RuntimeError(f"non-finite loss at step {done}: {values}; the last good checkpoint is kept")
            values.update(kimg=done * global_batch / 1000,
                          images_per_s=(done - step_last) * global_batch / max(now - t_last, 1e-9))
            tracker.scalars(done, values)
            stats.zero_()
            n_stats, t_last, step_last = 0, now, done
        if done % cfg.train.sample_every == 0 or last:
            tracker.images(done, "samples/fake", sample(G_local, fixed_z), f"fakes-{done:08d}.png")
        if done % cfg.train.ckpt_every == 0 or last:
            replicas = dist.check_replicas(accelerator, {"G": G_local, "D": accelerator.unwrap_model(nets["D"])})
            trainer_state.update(step=done, kimg=done * global_batch / 1000, world_size=accelerator.num_processes)
            checkpoint.save(accelerator, cfg.run_dir, done, trainer_state, replicas, cfg.train.keep_ckpts)


def _new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)
