"""The training loop, as a recipe (`Trainer.run`): preflight, build, resume, then D step + G step until
`train.steps`.

Progress is counted in optimizer steps (one D step + one G step) and kimg (thousands of real images seen
across all ranks), never epochs: every rank draws from an infinite stream, so all ranks run the same
number of steps and DDP cannot hang on a short rank.

Everything a resumed run needs to continue exactly is a function of the step: the checkpoint holds the
weights, optimizer and scaler states and every rank's RNG states, and the data stream restarts at the
step (data/stream.py). A resumed run therefore logs the same losses as an uninterrupted one.

The Trainer owns the run's state: `self.state` (what a checkpoint records, step and kimg among it) and
the log interval's clock. The step hands back what it accumulated (`TrainStep.drain`, `health`).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from dcgan_dist.config import Config, ConfigError, metric_list, save_config
from dcgan_dist.data.shards import ShardSet, verify
from dcgan_dist.data.stream import Placement, batches
from dcgan_dist.dist.collectives import check_replicas, gather_all, on_main, reduce
from dcgan_dist.dist.lifecycle import StopRequest, peer_lost, shutdown
from dcgan_dist.dist.setup import (autocast, bare, build_accelerator, describe, loader_workers, prepare,
                                   use_cuda_graph)
from dcgan_dist.errors import RunStopped, UserError, note, warn
from dcgan_dist.eval.attributes import scorer_for
from dcgan_dist.eval.evaluate import Evaluation, Protocol, network_digest
from dcgan_dist.fsutil import atomic_write_bytes, atomic_write_text, probe_writable
from dcgan_dist.nets import metrics
from dcgan_dist.nets.augment import parse_policy
from dcgan_dist.nets.ema import EMA
from dcgan_dist.nets.losses import LOSSES
from dcgan_dist.nets.models import build_models, sample
from dcgan_dist.ops import amp
from dcgan_dist.ops.cpu_conv import switched_layers, use_forward_weight_grads
from dcgan_dist.redact import redact, redact_all
from dcgan_dist.report.plots import write_report
from dcgan_dist.report.track import Tracker, run_id_for
from dcgan_dist.run import checkpoint
from dcgan_dist.run.layout import RunLayout
from dcgan_dist.run.lock import RunLock
from dcgan_dist.run.snapshot import FILENAME as SNAPSHOT
from dcgan_dist.run.snapshot import snapshot_bytes
from dcgan_dist.run.state import TrainerState
from dcgan_dist.train.step import NO_STEP, Nets, TrainStep, on_stream


def check_choices(cfg: Config) -> None:
    """The keys whose values name registry entries, which the schema's type check cannot see into."""
    try:
        parse_policy(cfg.gan.diffaugment)
    except ValueError as exc:
        raise ConfigError(f"config key 'gan.diffaugment': {exc}") from None
    if cfg.gan.loss not in LOSSES:
        raise ConfigError(f"config key 'gan.loss': unknown loss '{cfg.gan.loss}' (expected one of {', '.join(LOSSES)})")
    if cfg.gan.label_smoothing > 0 and not LOSSES[cfg.gan.loss].smoothable:
        raise ConfigError(f"config key 'gan.label_smoothing': {cfg.gan.label_smoothing} has no meaning with "
                          f"gan.loss={cfg.gan.loss}, which has no target for reals; set it to 0")
    for m in metric_list(cfg.eval.metrics):
        if m not in metrics.REGISTRY:
            raise ConfigError(f"config key 'eval.metrics': unknown metric '{m}' (expected a comma list of "
                              f"{', '.join(metrics.REGISTRY)})")
    ranked = [m.name for m in metrics.REGISTRY.values() if m.headline]
    if cfg.eval.best_by is not None and cfg.eval.best_by not in ranked:
        raise ConfigError(f"config key 'eval.best_by': expected one of {'|'.join(ranked)}|null, got "
                          f"{cfg.eval.best_by!r}")


def preflight(cfg: Config) -> ShardSet:
    """Every user error we can see before starting a process group, as a one-line UserError."""
    check_choices(cfg)
    shard_set = ShardSet.open(cfg.data.shards, cfg.data.cache_dir)
    count, shown = shard_set.manifest["count"], redact(cfg.data.shards)
    if shard_set.resolution != cfg.model.resolution:
        raise UserError(f"config key 'model.resolution' is {cfg.model.resolution} but the shards in "
                        f"'{shown}' are {shard_set.resolution}px; re-shard or change the key")
    if cfg.data.batch_size > count:
        raise UserError(f"config key 'data.batch_size' is {cfg.data.batch_size}, larger than the "
                        f"{count} images in '{shown}'")
    if metric_list(cfg.eval.metrics) and cfg.eval.num_images > count:
        raise UserError(f"config key 'eval.num_images' is {cfg.eval.num_images}, more than the "
                        f"{count} images in '{shown}'")
    try:
        probe_writable(Path(cfg.run_dir))
    except OSError as exc:
        raise UserError(f"config key 'run_dir': '{cfg.run_dir}' is not writable ({exc.strerror})") from None
    return shard_set


def train(cfg: Config) -> None:
    shard_set = preflight(cfg)
    accelerator = build_accelerator(cfg)
    lock = RunLock(RunLayout(cfg.run_dir).lock, cfg.run_dir) if accelerator.is_main_process else None
    try:
        # Before anything is written to run_dir: a second job on it stops here, on every rank.
        on_main(accelerator, lock.acquire if lock else None)
        trainer, clean = Trainer(accelerator, cfg, shard_set, lock), False
        try:
            trainer.run()
            clean = True
            trainer.report()
        finally:
            trainer.close(clean)
    except RuntimeError as exc:
        lost = peer_lost(accelerator, exc, cfg.train.collective_timeout_s)
        if lost is None:
            raise
        raise lost from None
    finally:
        if lock is not None:
            lock.release()


def build_nets(acc: Accelerator, cfg: Config, stream: Optional["torch.cuda.Stream"] = None) -> Nets:
    """G, D, their Adam optimizers and the EMA of G, as the config says, prepared for this job's ranks."""
    amp.check()
    # Same seed on every rank so replicas start equal (DDP also broadcasts rank 0's weights).
    torch.manual_seed(cfg.seed)
    G, D = build_models(cfg.model.nz, cfg.model.ngf, cfg.model.ndf, cfg.model.resolution)
    if cfg.train.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    if acc.device.type == "cpu" and cfg.train.cpu_forward_weight_grads:
        for net in (G, D):
            use_forward_weight_grads(net)
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    # Fused: one kernel per update, and it can skip an update on the device (found_inf), never syncing.
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.optim.lr, betas=betas, fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr, betas=betas, fused=True)
    with on_stream(stream):                  # DDP is built on the stream the graph is captured on
        (G, D), (opt_g, opt_d) = prepare(acc, [G, D], [opt_g, opt_d])
    G_local = bare(acc, G)
    # Every rank keeps the same EMA (G is the same everywhere); checkpoints carry it like the models.
    ema = EMA(G_local, cfg.train.ema_halflife_kimg, cfg.train.ema_rampup, cfg.data.batch_size * acc.num_processes)
    nets = Nets(G=G, D=D, G_local=G_local, D_local=bare(acc, D), opt_g=opt_g.optimizer, opt_d=opt_d.optimizer, ema=ema)
    configure_optimizers(nets, cfg, capturable=stream is not None)
    return nets


def configure_optimizers(nets: Nets, cfg: Config, capturable: bool) -> None:
    """The config, not the checkpoint, sets lr and betas: loading a checkpoint restores the saved ones,
    which would silently ignore `optim.lr=...` given to a resumed run. The same goes for how Adam runs:
    fused, and capturable when a CUDA graph will hold it, with its step counter on the device."""
    lr_d = cfg.optim.lr if cfg.optim.ttur_lr_d is None else cfg.optim.ttur_lr_d
    for opt, lr in ((nets.opt_g, cfg.optim.lr), (nets.opt_d, lr_d)):
        for group in opt.param_groups:
            group.update(lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=True, foreach=None,
                         capturable=capturable)
            for p in group["params"]:
                state = opt.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(p.device, torch.float32)


def periodic_evaluation(acc: Accelerator, cfg: Config, shard_set: ShardSet) -> tuple[Optional[Evaluation], str]:
    """The trainer's evaluation (None without eval.metrics) and the metric that picks the best checkpoint:
    eval.best_by, or the first headline metric in the registry's order that can be computed (fid when it
    can, else swd)."""
    names = metric_list(cfg.eval.metrics)
    if not names:
        return None, ""
    inception = None
    if any(metrics.REGISTRY[m].needs_inception for m in names):
        inception = metrics.load_inception(cfg.eval.inception_weights, acc.device, quiet=not acc.is_main_process)
    num, count = cfg.eval.num_images, shard_set.manifest["count"]
    proto = Protocol(names, num, num, num == count, cfg.eval.batch_per_rank, cfg.seed, num,
                     network_digest(inception.source) if inception is not None else "")
    can = [m.name for m in metrics.REGISTRY.values() if m.headline and m.name in names
           and (inception is not None or not m.needs_inception)]
    return Evaluation(acc, shard_set, proto, inception, Path(cfg.run_dir)), cfg.eval.best_by or (can[0] if can else "")


class Trainer:
    """One training run on this rank. `__init__` gets everything ready (the shards checked, the nets
    built and resumed, logging started); `run()` is the recipe; `close()` releases it all, in order."""

    def __init__(self, accelerator: Accelerator, cfg: Config, shard_set: ShardSet, lock: Optional[RunLock]):
        self.acc, self.cfg, self.lock, self.main = accelerator, cfg, lock, accelerator.is_main_process
        self.layout, self.full_set = RunLayout(cfg.run_dir), shard_set
        self.global_batch = cfg.data.batch_size * accelerator.num_processes
        self.graph = use_cuda_graph(cfg.train.cuda_graph, accelerator)
        shard_set, excluded = self._verified(shard_set)
        if self.main:
            checkpoint.recover_best(cfg.run_dir)             # a best replacement cut short by a kill
        stream = torch.cuda.Stream(accelerator.device) if self.graph else None
        self.nets = build_nets(accelerator, cfg, stream)
        self.state = self._resume()
        # Shards left out count once in data_errors, not again at every restart. Rank 0 carries the
        # run's total from the checkpoint; the others count from zero.
        newly_excluded = excluded - set(self.state.excluded_shards)
        self.state.excluded_shards = sorted(excluded | set(self.state.excluded_shards))
        self.data_errors = self.state.data_errors + len(newly_excluded) if self.main else 0
        self.skipped_before = (self.state.skipped_d, self.state.skipped_g)
        workers = loader_workers(cfg.data.num_workers, accelerator.device)
        self.tracker = self._start_tracking(workers)
        self.batches = batches(shard_set, cfg, Placement(accelerator.process_index, accelerator.num_processes,
                                                         workers), self.state.step)
        self.step = TrainStep(self.nets, cfg, autocast(accelerator), accelerator.scaler, stream)
        self.evaluation, self.best_by = periodic_evaluation(accelerator, cfg, self.full_set)
        self.scorer = scorer_for(self.full_set) if self.evaluation and self.tracker.use_wandb and \
            cfg.wandb.samples_table else None
        self.stop = StopRequest(accelerator)
        self.interval_t = time.time()
        self.fixed_z = torch.randn(cfg.train.num_samples, cfg.model.nz,
                                   generator=torch.Generator().manual_seed(cfg.seed)).to(accelerator.device)

    # ------------------------------------------------------------------------------------------------
    # The recipe

    def run(self) -> None:
        """Train from the resumed step to train.steps: step, log, sample, evaluate, checkpoint; stop
        with a checkpoint when asked to."""
        train, state, start = self.cfg.train, self.state, self.state.step
        if start >= train.steps:
            note(f"already at step {start} of train.steps={train.steps}; raise it to train longer")
        while state.step < train.steps:
            if self.stop.poll():
                if state.step != start and state.step % train.ckpt_every != 0:
                    self.save()
                note(f"stopped by signal at step {state.step}; rerun the same command to resume")
                return
            images, bad = next(self.batches)
            self.data_errors += bad
            if state.step == 0:
                self.tracker.images(0, 0.0, "samples/real", images[: train.num_samples], self.layout.reals)
                self.samples()
            before = state.images_seen
            self.step(images, state.step, before + self.global_batch)
            state.step, state.images_seen = state.step + 1, before + self.global_batch
            self.tracker.step()
            done, last = state.step, state.step == train.steps
            if done % train.log_every == 0 or last:
                self.log()
            if done % train.sample_every == 0 or last:
                self.samples()
            if self.evaluation is not None and (self._eval_due(before) or last):
                self.evaluate()
            if done % train.ckpt_every == 0 or last:
                self.save()

    def log(self) -> None:
        """Collective: the interval's metrics line; the only host-device syncs between log intervals."""
        sums, n = self.step.drain()
        means = (reduce(self.acc, sums, "mean") / max(n, 1)).tolist()
        counters = self._counters()
        now = time.time()
        values = dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), means))
        values.update(kimg=self.state.kimg, images_per_s=n * self.global_batch / max(now - self.interval_t, 1e-9),
                      **counters)
        self.tracker.scalars(self.state.step, values)
        self.interval_t = now

    def samples(self) -> None:
        """Rank 0: the fixed-noise grid from the EMA generator, and the raw G's beside it."""
        if self.main:
            for name, G, raw in (("samples/fake", self.nets.ema.module, False),
                                 ("samples/fake_raw", self.nets.G_local, True)):
                self.tracker.images(self.state.step, self.state.kimg, name, sample(G, self.fixed_z),
                                    self.layout.fakes(self.state.step, raw=raw))

    def evaluate(self) -> None:
        """Collective: the EMA generator's metrics, logged; the best checkpoint replaced when they are the
        best so far by eval.best_by (in the direction the metric registry gives)."""
        started, state = time.time(), self.state
        values = self.evaluation.score(self.nets.ema.module)
        state.last_eval = values
        self.tracker.scalars(state.step, {"kimg": state.kimg, **values}, section="eval")
        key, best = self.best_by, state.best
        same_metric = bool(best) and best["metric"] == key
        if key in values and (not same_metric or metrics.better(key, values[key], best["value"])):
            state.best = {"metric": key, "value": values[key], "step": state.step, "metrics": values}
            self.save(best=True)
        if self.scorer is not None:
            images = metrics.to_uint8(sample(self.nets.ema.module, self.fixed_z)).cpu()
            self.tracker.samples_table(state.step, state.kimg, images, torch.sigmoid(self.scorer.logits(images)))
        self.interval_t += time.time() - started          # images_per_s counts training time only

    def save(self, best: bool = False) -> None:
        """Collective: a checkpoint of this step (checkpoints/best with `best`), its generator published
        and sent to W&B."""
        acc, cfg = self.acc, self.cfg
        on_main(acc, self.lock.check if self.lock else None, startup=False)   # a job that lost run_dir stops
        state = self.state
        for key, value in self._counters().items():
            setattr(state, key, value)
        state.world_size, state.global_batch, state.mixed_precision = acc.num_processes, self.global_batch, \
            acc.mixed_precision
        replicas = check_replicas(acc, {"G": self.nets.G_local, "D": self.nets.D_local})
        extra = {}
        if self.main:
            snapshot = snapshot_bytes(self.nets.ema.module, state.step, state.kimg, state.last_eval,
                                      self.full_set.shown)
            extra = {"replicas.json": json.dumps(replicas, indent=1, sort_keys=True).encode(), SNAPSHOT: snapshot}
        path = checkpoint.save(acc, self.layout.best if best else self.layout.step_dir(state.step), self.nets,
                               state, extra)
        if self.main:
            if not best:
                checkpoint.rotate(cfg.run_dir, cfg.train.keep_ckpts)
            self._publish_generator(path, best)
            self.tracker.saved(path, state, best, final=state.step == cfg.train.steps and not best)

    def report(self) -> None:
        """Rank 0: the end-of-run pictures, into the same W&B run before it closes."""
        if self.main:
            self.tracker.report(write_report(Path(self.cfg.run_dir)))

    def close(self, clean: bool) -> None:
        """Stop the loader and W&B and take the process group down; after an error too. The step and the
        evaluation hold DDP's wrappers: every reference goes before the group does."""
        acc = self.acc
        self.stop.close(wait=clean)
        self.tracker.close()
        self.batches.close()
        self.__dict__.clear()
        shutdown(acc, clean=clean)

    # ------------------------------------------------------------------------------------------------
    # Helpers of the recipe

    def _counters(self) -> dict:
        """Collective, and a sync: the run's skip and data-error totals. Raises, naming the step, if any
        rank saw a non-finite loss or gave up after too many skipped updates."""
        health = self.step.health()
        first_bad, gave_up = (int(v) for v in reduce(self.acc, health[:2], "min").tolist())
        if first_bad < NO_STEP:
            raise RunStopped(f"non-finite loss at step {first_bad}; stopping without saving. Last good "
                             f"checkpoint: {self.layout.latest_checkpoint() or 'none'}")
        if gave_up < NO_STEP:
            raise RunStopped(f"{self.cfg.train.max_consecutive_skips} updates in a row skipped for non-finite "
                             f"values, the last at step {gave_up}; the run has diverged (last good checkpoint kept)")
        errors = reduce(self.acc, torch.tensor([float(self.data_errors)], device=self.acc.device))
        skipped = [before + int(s) for before, s in zip(self.skipped_before, health[2:].tolist())]
        return {"skipped_d": skipped[0], "skipped_g": skipped[1], "data_errors": int(errors.item())}

    def _eval_due(self, images_before: int) -> bool:
        """Whether this step carried the images seen past a multiple of eval.every_kimg (0: at the end
        only). Counted in images, so the cadence holds when a resumed run has another global batch."""
        every = round((self.cfg.eval.every_kimg or 0) * 1000, 6)
        return every > 0 and self.state.images_seen // every > images_before // every

    def _publish_generator(self, saved: Path, best: bool) -> None:
        """run_dir/generator.safetensors: a copy of the best snapshot, or of the latest while no best exists.
        A regular save after a best leaves the copy as it is."""
        if best or not (self.layout.best / SNAPSHOT).is_file():
            try:
                atomic_write_bytes(self.layout.generator, (saved / SNAPSHOT).read_bytes())
            except OSError as exc:          # a convenience copy: the checkpoint holds the same file
                warn(f"could not update '{self.layout.generator}' ({exc.strerror}); '{saved / SNAPSHOT}' has the "
                     "same weights")

    # ------------------------------------------------------------------------------------------------
    # Getting ready

    def _verified(self, shard_set: ShardSet) -> tuple[ShardSet, set]:
        """The set without the shards whose bytes do not match its manifest, and their names. Each rank
        checks every world_size-th shard, so no rank hashes (or, with data.verify_remote, downloads) the
        whole set while the others wait. Without data.verify_remote, a remote set is checked shard by
        shard as the loader downloads it instead."""
        acc = self.acc
        if shard_set.remote and not self.cfg.data.verify_remote:
            return shard_set, set()
        mine = list(shard_set.shards[acc.process_index::acc.num_processes])
        bad = {}
        for found in gather_all(acc, verify(shard_set, mine), startup=True):
            bad.update(found)
        by_name = {s.name: s for s in shard_set.shards}
        for name, why in sorted(bad.items()):
            warn(f"shard '{by_name[name].shown}' {why}; training without it (counted in data_errors)")
        if len(bad) == len(shard_set.shards):
            raise RunStopped(f"no shard of '{redact(shard_set.location)}' matches its manifest; re-shard or fix "
                             "the copy")
        return shard_set.without(set(bad)), set(bad)

    def _resume(self) -> TrainerState:
        """The newest checkpoint's state (a fresh one without), with what changed said in one line each:
        world size, precision. A rank the checkpoint has no random state for (the job grew) draws its
        noise from a seed made of the run's seed, its rank and the step: deterministic, and unlike any
        other rank's stream."""
        acc, cfg, rank = self.acc, self.cfg, self.acc.process_index
        set_seed(cfg.seed + rank)                          # per-rank noise; a resume restores the saved states
        self.resumed_from, state, own_rng = checkpoint.resume(acc, cfg.run_dir, self.nets)
        configure_optimizers(self.nets, cfg, capturable=self.graph)
        if state is None:
            return TrainerState(wandb_run_id=secrets.token_hex(4))
        step = state.step
        if not own_rng:
            digest = hashlib.sha256(f"dcgan-dist/{cfg.seed}/{rank}/{step}".encode()).digest()
            set_seed(int.from_bytes(digest[:4], "little"))
        old_batch, old_world = state.global_batch or self.global_batch, state.world_size or acc.num_processes
        if (old_world, old_batch) != (acc.num_processes, self.global_batch):
            ranks = lambda n: f"{n} rank{'s' if n != 1 else ''}"
            note(f"resuming at step {step} ({state.kimg:g} kimg) on {ranks(acc.num_processes)} instead of "
                 f"{ranks(old_world)}: global batch {old_batch} -> {self.global_batch} ({cfg.data.batch_size} per "
                 f"rank); optim.lr stays {cfg.optim.lr:g}, as the config says (it is never scaled with the batch); "
                 "kimg carries on, but the data order and per-rank noise differ from an uninterrupted run")
        old_precision = state.mixed_precision or acc.mixed_precision
        if old_precision != acc.mixed_precision:
            note(f"resuming at step {step} in {acc.mixed_precision} instead of {old_precision}: weights and "
                 "optimizer states are fp32 in both, so only the arithmetic of later steps changes")
        return state

    def _start_tracking(self, workers: int) -> Tracker:
        """run_dir's config, facts and W&B run id (rank 0), the banner, then the tracker and its W&B run."""
        acc, cfg, state = self.acc, self.cfg, self.state
        facts = {"world_size": acc.num_processes, "num_machines": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
                 "global_batch": self.global_batch, "mixed_precision": acc.mixed_precision,
                 "num_workers": workers, "dataset_count": self.full_set.manifest["count"],
                 "cpu_forward_weight_grad_layers": switched_layers(self.nets.G_local, self.nets.D_local)}
        if self.main:
            state.wandb_run_id = run_id_for(cfg.run_dir, state.wandb_run_id or secrets.token_hex(4))
            save_config(cfg, self.layout.config, facts=facts)
            atomic_write_text(self.layout.facts, json.dumps(redact_all(facts), indent=1) + "\n")
            start = f"resuming from {self.resumed_from}" if self.resumed_from else "fresh start"
            print(f"dcgan-dist: {describe(acc, cfg.data.batch_size, self.graph)} "
                  f"images={self.full_set.manifest['count']} steps={cfg.train.steps} {start}", flush=True)
        # start_step tells launch/wandb_sync.py where this start took over from the one before it.
        config = redact_all({**cfg.to_dict(), "run": {**facts, "start_step": state.step}})
        tracker = Tracker(cfg, state, config, self.full_set.digest)
        tracker.relog_best()
        return tracker
