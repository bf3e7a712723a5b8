"""The training loop, as a recipe (Trainer.run): preflight, build, resume, then D step + G step until `train.steps`.

Progress is counted in optimizer steps (one D step + one G step) and kimg (thousands of real images
seen across all ranks), never epochs: every rank draws from an infinite stream, so all ranks run the
same number of steps and DDP cannot hang on a short rank.

Everything a resumed run needs to continue exactly is a function of the step: the checkpoint holds the
weights, optimizer and scaler states and every rank's RNG states, and the data stream restarts at the
step (data/stream.py). A resumed run therefore logs the same losses as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from dcgan_dist.config import Config, metric_list, save_config
from dcgan_dist.data.shards import ShardSet, verify
from dcgan_dist.data.stream import make_loader, next_batch, stop_loader
from dcgan_dist.attributes import scorer_for
from dcgan_dist.augment import parse_policy
from dcgan_dist import metrics
from dcgan_dist.ema import EMA
from dcgan_dist.errors import RunStopped, UserError
from dcgan_dist.fsutil import atomic_write_bytes, atomic_write_text, probe_writable
from dcgan_dist.layout import MARKER, STATE_FILE, RunLayout
from dcgan_dist.models import build_models
from dcgan_dist.redact import redact, redact_all
from dcgan_dist.report import write_report
from dcgan_dist.runlock import RunLock
from dcgan_dist.sample import sample
from dcgan_dist.snapshot import FILENAME as SNAPSHOT
from dcgan_dist.snapshot import snapshot_bytes
from dcgan_dist.track import Tracker, run_id_for, start_wandb
from dcgan_dist.train import checkpoint, dist
from dcgan_dist.ops import amp
from dcgan_dist.ops.cpu_conv import switched_layers, use_forward_weight_grads
from dcgan_dist.train.evaluate import Evaluator
from dcgan_dist.train.state import TrainerState
from dcgan_dist.train.step import NO_STEP, Nets, Progress, Remedies, StepRunner, Totals, TrainStep, on_stream


def preflight(cfg: Config) -> ShardSet:
    """Every user error we can see before starting a process group, as a one-line UserError."""
    shard_set = ShardSet.open(cfg.data.shards)
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


def build(accelerator: Accelerator, cfg: Config, stream: Optional["torch.cuda.Stream"] = None) -> Nets:
    amp.check()
    # Same seed on every rank so replicas start equal (DDP also broadcasts rank 0's weights).
    torch.manual_seed(cfg.seed)
    G, D = build_models(cfg.model.nz, cfg.model.ngf, cfg.model.ndf, cfg.model.resolution)
    if cfg.train.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    if accelerator.device.type == "cpu" and cfg.train.cpu_forward_weight_grads:
        for net in (G, D):
            use_forward_weight_grads(net)
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    # Fused: one kernel per update, and it can skip an update on the device (found_inf), never syncing.
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.optim.lr, betas=betas, fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr, betas=betas, fused=True)
    with on_stream(stream):                  # DDP is built on the stream the graph is captured on
        (G, D), (opt_g, opt_d) = dist.prepare(accelerator, [G, D], [opt_g, opt_d])
    G_local = dist.bare(accelerator, G)
    # Every rank keeps the same EMA (G is the same everywhere); checkpoints carry it like the models.
    ema = EMA(G_local, cfg.train.ema_halflife_kimg, cfg.train.ema_rampup,
              cfg.data.batch_size * accelerator.num_processes)
    return Nets(G=G, D=D, G_local=G_local, D_local=dist.bare(accelerator, D), opt_g=opt_g.optimizer,
                opt_d=opt_d.optimizer, ema=ema)


def apply_optim_config(nets: Nets, cfg: Config, graph: bool) -> None:
    """The config, not the checkpoint, sets lr and betas: load_state restores the saved ones, which
    would silently ignore `optim.lr=...` given to a resumed run. The same goes for how Adam runs: fused,
    and capturable when a CUDA graph will hold it. Checkpoints written without fused Adam keep its step
    counter on the host, where the fused kernel cannot read it."""
    lr_d = cfg.optim.lr if cfg.optim.ttur_lr_d is None else cfg.optim.ttur_lr_d
    for opt, lr in ((nets.opt_g, cfg.optim.lr), (nets.opt_d, lr_d)):
        for group in opt.param_groups:
            group.update(lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=True, foreach=None,
                         capturable=graph)
            for p in group["params"]:
                state = opt.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(p.device, torch.float32)


@dataclass
class Interval:
    """What happened since the last log line, on the host; the device side is in `Totals`."""

    t: float                         # wall-clock time at its start
    step: int                        # the step it started after
    n: int = 0                       # steps trained in it
    data_errors: int = 0             # unreadable blocks or shard errors met by this rank's loader, all run


def train(cfg: Config) -> None:
    shard_set = preflight(cfg)
    accelerator = dist.build_accelerator(cfg)
    lock = RunLock(RunLayout.of(cfg.run_dir).lock, cfg.run_dir) if accelerator.is_main_process else None
    try:
        # Before anything is written to run_dir: a second job on it stops here, on every rank.
        dist.on_main(accelerator, lock.acquire if lock else None)
        trainer, clean = Trainer(accelerator, cfg, shard_set, lock), False
        try:
            trainer.run()
            clean = True
            trainer.report()
        finally:
            trainer.close(clean)
    except RuntimeError as exc:
        lost = dist.peer_lost(accelerator, exc, cfg.train.collective_timeout_s)
        if lost is None:
            raise
        raise lost from None
    finally:
        if lock is not None:
            lock.release()


def _verified(accelerator: Accelerator, cfg: Config, shard_set: ShardSet, cache: Optional[Path]) -> tuple[ShardSet, set]:
    """The set without the shards whose bytes do not match its manifest, and their names. Each rank
    checks every world_size-th shard, so no rank hashes (or, with data.verify_remote, downloads) the
    whole set while the others wait. Without data.verify_remote, a remote set is checked shard by
    shard as the loader downloads it instead."""
    if shard_set.remote and not cfg.data.verify_remote:
        return shard_set, set()
    mine = list(shard_set.shards[accelerator.process_index::accelerator.num_processes])
    bad = {}
    for found in dist.gather_all(accelerator, verify(mine, cache), startup=True):
        bad.update(found)
    if accelerator.is_main_process:
        by_name = {s.name: s for s in shard_set.shards}
        for name, why in sorted(bad.items()):
            print(f"warning: shard '{by_name[name].shown}' {why}; training without it (counted in data_errors)",
                  file=sys.stderr, flush=True)
    if len(bad) == len(shard_set.shards):
        raise RunStopped(f"no shard of '{redact(shard_set.location)}' matches its manifest; re-shard or fix the copy")
    return shard_set.without(set(bad)), set(bad)


class Trainer:
    """One training run on this rank. `__init__` gets everything ready (the shards checked, the nets
    built and resumed, logging started); `run()` is the recipe; `close()` releases it all, in order."""

    def __init__(self, accelerator: Accelerator, cfg: Config, shard_set: ShardSet, lock: Optional[RunLock]):
        self.acc, self.cfg, self.lock, self.main = accelerator, cfg, lock, accelerator.is_main_process
        rank, world = accelerator.process_index, accelerator.num_processes
        self.graph = dist.use_cuda_graph(cfg.train.cuda_graph, accelerator)
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir and shard_set.remote else None
        self.full_set = shard_set
        shard_set, excluded = _verified(accelerator, cfg, shard_set, cache)
        if self.main:
            checkpoint.recover_best(cfg.run_dir)             # a best replacement cut short by a kill
        stream = dist.graph_stream(accelerator, self.graph)
        self.nets = build(accelerator, cfg, stream)
        self.resumed_from, self.state, self.progress = _resume(accelerator, cfg, self.nets, cfg.data.batch_size * world)
        apply_optim_config(self.nets, cfg, self.graph)
        # Shards left out count once in data_errors, not again at every restart.
        newly_excluded = excluded - set(self.state.excluded_shards)
        self.state.excluded_shards = sorted(excluded | set(self.state.excluded_shards))
        workers = dist.loader_workers(cfg.data.num_workers, accelerator.device)
        self.tracker = self._start_tracking(workers)
        self.scorer = scorer_for(self.full_set) if self.tracker.use_wandb and cfg.wandb.samples_table and \
            metric_list(cfg.eval.metrics) else None
        loader = make_loader(shard_set, cfg.data.batch_size, cfg.seed, rank, world, workers, cfg.data.shuffle_buffer,
                             self.state.step, pin_memory=accelerator.device.type == "cuda", cache=cache)
        self.batches = iter(loader)
        self.runner = make_runner(accelerator, cfg, self.nets, self.state, self.graph, stream, self.progress)
        self.evaluator = Evaluator(accelerator, cfg, self.full_set, cache) if metric_list(cfg.eval.metrics) else None
        self.stop = dist.StopRequest(accelerator)
        # Rank 0 carries the run's data_errors total from the checkpoint; the others count from zero.
        carried = self.state.data_errors + len(newly_excluded) if self.main else 0
        self.interval = Interval(t=time.time(), step=self.state.step, data_errors=carried)
        self.fixed_z = torch.randn(cfg.train.num_samples, cfg.model.nz,
                                   generator=torch.Generator().manual_seed(cfg.seed)).to(accelerator.device)

    def run(self) -> None:
        """Train from the resumed step to train.steps: step, log, sample, evaluate, checkpoint; stop
        with a checkpoint when asked to."""
        train, start = self.cfg.train, self.state.step
        if start >= train.steps:
            self.tracker.note(f"already at step {start} of train.steps={train.steps}; raise it to train longer")
        for step in range(start, train.steps):
            if self.stop.poll():
                self.stopped(step, start)
                return
            self.runner(self.next_batch(step), step)
            self.interval.n += 1
            self.tracker.step()
            done = step + 1
            last = done == train.steps
            if done % train.log_every == 0 or last:
                _log(self.acc, self.cfg, self.tracker, self.runner.step.totals, self.interval, done, self.progress)
            if done % train.sample_every == 0 or last:
                _samples(self.tracker, self.nets, self.fixed_z, done, self.progress.kimg(done))
            if self.evaluator is not None and (_eval_due(self.cfg, self.progress, done) or last):
                self.evaluate(done)
            if done % train.ckpt_every == 0 or last:
                self.save(done)

    def report(self) -> None:
        """Rank 0: the end-of-run pictures, into the same W&B run before it closes."""
        if self.main:
            self.tracker.report(write_report(Path(self.cfg.run_dir)))

    def next_batch(self, step: int) -> torch.Tensor:
        batch, data_errors = next_batch(self.batches)
        self.interval.data_errors += data_errors
        if step == 0:
            self.tracker.images(0, 0.0, "samples/real", batch[: self.cfg.train.num_samples].float() / 127.5 - 1,
                                self.tracker.layout.reals)
            _samples(self.tracker, self.nets, self.fixed_z, 0, 0.0)
        return batch

    def stopped(self, step: int, start: int) -> None:
        if step != start and step % self.cfg.train.ckpt_every != 0:
            self.save(step)
        self.tracker.note(f"stopped by signal at step {step}; rerun the same command to resume")

    def evaluate(self, done: int) -> None:
        started = time.time()
        if _evaluate(self.evaluator, self.nets, self.tracker, self.state, done, self.progress):
            self.save(done, best=True)
        if self.scorer is not None:
            _samples_table(self.tracker, self.scorer, self.nets, self.fixed_z, done, self.progress.kimg(done))
        self.interval.t += time.time() - started          # images_per_s counts training time only

    def save(self, done: int, best: bool = False) -> None:
        """Collective: a checkpoint of step `done` (checkpoints/best with `best`), its generator
        published and sent to W&B."""
        acc, cfg, nets = self.acc, self.cfg, self.nets
        dist.on_main(acc, self.lock.check if self.lock else None, startup=False)   # a job that lost run_dir stops
        health = _check_health(acc, self.runner.step.totals, self.interval, cfg)
        replicas = dist.check_replicas(acc, {"G": nets.G_local, "D": nets.D_local})
        _record(self.state, acc, self.progress, done, _counters(acc, health, self.interval))
        snapshot = {SNAPSHOT: self._snapshot(done)} if self.main else {}
        path = checkpoint.save(acc, cfg.run_dir, done, nets, self.state, replicas, cfg.train.keep_ckpts,
                               best=best, extra_files=snapshot)
        if self.main:
            _publish_generator(RunLayout.of(cfg.run_dir), path, best)
            final = done == cfg.train.steps and not best          # the regular save that follows is the last
            _log_artifacts(self.tracker, cfg, path, self.state, self.state.wandb_run_id, self.full_set.digest,
                           best, final)

    def _snapshot(self, done: int) -> bytes:
        cfg = self.cfg
        return snapshot_bytes(self.nets.ema.module, resolution=cfg.model.resolution, nz=cfg.model.nz,
                              ngf=cfg.model.ngf, step=done, kimg=self.progress.kimg(done),
                              metrics=self.state.last_eval, shards=self.full_set.shown)

    def _start_tracking(self, workers: int) -> Tracker:
        """run_dir's config, facts and W&B run id (rank 0), the banner, then W&B and the tracker."""
        acc, cfg, state = self.acc, self.cfg, self.state
        facts = {"world_size": acc.num_processes, "num_machines": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
                 "global_batch": self.progress.global_batch, "mixed_precision": acc.mixed_precision,
                 "num_workers": workers, "dataset_count": self.full_set.manifest["count"],
                 "cpu_forward_weight_grad_layers": switched_layers(self.nets.G_local, self.nets.D_local)}
        if self.main:
            layout = RunLayout.of(cfg.run_dir)
            state.wandb_run_id = run_id_for(cfg.run_dir, state.wandb_run_id or _new_run_id())
            save_config(cfg, layout.config, facts=facts)
            atomic_write_text(layout.facts, json.dumps(redact_all(facts), indent=1) + "\n")
            start = f"resuming from {self.resumed_from}" if self.resumed_from else "fresh start"
            print(f"dcgan-dist: {dist.describe(acc, cfg.data.batch_size, self.graph)} "
                  f"images={self.full_set.manifest['count']} steps={cfg.train.steps} {start}", flush=True)
        # start_step tells launch/wandb_sync.py where this start took over from the one before it.
        mode = start_wandb(acc, cfg, state.wandb_run_id,
                           redact_all({**cfg.to_dict(), "run": {**facts, "start_step": state.step}}))
        tracker = Tracker(acc, cfg, state.step, mode)
        if self.main:
            _log_best_again(tracker, cfg, state.wandb_run_id, self.full_set.digest)
        return tracker

    def close(self, clean: bool) -> None:
        """Stop the loader and W&B and take the process group down; after an error too. The loader,
        runner and evaluator hold DDP's wrappers: every reference goes before the group does."""
        acc, nets = self.acc, self.nets
        self.stop.close(wait=clean)
        self.tracker.close()
        stop_loader(self.batches)
        self.__dict__.clear()
        dist.shutdown(acc, [nets], clean=clean)


def _resume(accelerator: Accelerator, cfg: Config, nets: Nets,
            global_batch: int) -> tuple[Optional[Path], TrainerState, Progress]:
    """Load the newest checkpoint, if any, and say what changed if its world size or precision differ.

    A rank the checkpoint has no random state for (the job grew) draws its noise from a seed made of the
    run's seed, its rank and the step: deterministic, and unlike any other rank's stream."""
    rank = accelerator.process_index
    set_seed(cfg.seed + rank)                          # per-rank noise; a resume restores the saved states
    resumed_from, state, own_rng = checkpoint.resume(accelerator, cfg.run_dir, nets)
    if state is None:
        return None, TrainerState(wandb_run_id=_new_run_id()), Progress(0, 0, global_batch)
    step = state.step
    if not own_rng:
        set_seed(_derived_seed(cfg.seed, rank, step))
    old_batch = state.global_batch or global_batch
    images = state.images_seen if state.images_seen is not None else step * old_batch
    old_world = state.world_size or accelerator.num_processes
    old_precision = state.mixed_precision or accelerator.mixed_precision
    if accelerator.is_main_process and (old_world, old_batch) != (accelerator.num_processes, global_batch):
        ranks = lambda n: f"{n} rank{'s' if n != 1 else ''}"
        print(f"note: resuming at step {step} ({images / 1000:g} kimg) on {ranks(accelerator.num_processes)} instead "
              f"of {ranks(old_world)}: global batch {old_batch} -> {global_batch} ({cfg.data.batch_size} per rank); "
              f"optim.lr stays {cfg.optim.lr:g}, as the config says (it is never scaled with the batch); kimg "
              "carries on, but the data order and per-rank noise differ from an uninterrupted run",
              file=sys.stderr, flush=True)
    if accelerator.is_main_process and old_precision != accelerator.mixed_precision:
        print(f"note: resuming at step {step} in {accelerator.mixed_precision} instead of {old_precision}: weights and "
              "optimizer states are fp32 in both, so only the arithmetic of later steps changes",
              file=sys.stderr, flush=True)
    return resumed_from, state, Progress(step, images, global_batch)


def _derived_seed(seed: int, rank: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"dcgan-dist/{seed}/{rank}/{step}".encode()).digest()[:4], "little")


def make_runner(accelerator: Accelerator, cfg: Config, nets: Nets, trainer_state: TrainerState, graph: bool,
                stream: Optional["torch.cuda.Stream"], progress: Optional[Progress] = None) -> StepRunner:
    """The step, wrapped in its runner. `progress` defaults to a run that started at trainer_state's step
    with nothing seen (the benchmarks' case)."""
    progress = progress or Progress(trainer_state.step, 0, cfg.data.batch_size * accelerator.num_processes)
    totals = Totals(accelerator.device, trainer_state.step, (trainer_state.skipped_d, trainer_state.skipped_g))
    guard = cfg.train.nonfinite == "skip" and accelerator.scaler is None
    remedies = Remedies(loss=cfg.gan.loss, diffaugment=parse_policy(cfg.gan.diffaugment),
                        real_target=1.0 - cfg.gan.label_smoothing,
                        instance_noise=cfg.gan.instance_noise, instance_noise_kimg=cfg.gan.instance_noise_kimg)
    step = TrainStep(nets, totals, dist.autocast(accelerator), accelerator.scaler, guard,
                     cfg.train.max_consecutive_skips, remedies, nets.ema, progress)
    shape = (cfg.data.batch_size, 3, cfg.model.resolution, cfg.model.resolution)
    # DDP must see 11 eager iterations before a capture (CUDA semantics docs); one rank needs only a
    # few, for cuDNN autotuning and the lazily created optimizer and scaler state.
    warmup = 11 if accelerator.num_processes > 1 else 3
    return StepRunner(step, shape, cfg.model.nz, accelerator.device, cfg.train.channels_last, graph=graph,
                      warmup_steps=warmup, stream=stream)


def _samples(tracker: Tracker, nets: Nets, fixed_z: torch.Tensor, step: int, kimg: float) -> None:
    """The fixed-noise grid from the EMA generator, and the raw G's beside it."""
    if tracker.enabled:
        tracker.images(step, kimg, "samples/fake", sample(nets.ema.module, fixed_z), tracker.layout.fakes(step))
        tracker.images(step, kimg, "samples/fake_raw", sample(nets.G_local, fixed_z),
                       tracker.layout.fakes(step, raw=True))


def _samples_table(tracker: Tracker, scorer, nets: Nets, fixed_z: torch.Tensor, step: int, kimg: float) -> None:
    """Rank 0: the EMA generator's fixed-noise samples with the attribute classifier's scores."""
    from dcgan_dist.attributes import probabilities
    from dcgan_dist.data.celeba import ATTRIBUTE_NAMES
    from dcgan_dist.metrics import to_uint8

    with torch.no_grad():
        images = to_uint8(sample(nets.ema.module, fixed_z)).cpu()
    tracker.samples_table(step, kimg, images, probabilities(scorer, images), list(ATTRIBUTE_NAMES))


def _log_artifacts(tracker: Tracker, cfg: Config, saved: Path, state: TrainerState, run_id: str, manifest_digest: str,
                   best: bool, final: bool, checkpoints: bool = True) -> None:
    """Rank 0: the EMA generator of checkpoint `saved` (its trainer_state: `state`) as a `model`
    artifact when the best changes (alias best) and at the end (alias latest, and best if it is), with
    what a reader needs to trust it; every full checkpoint too with wandb.log_checkpoints. W&B keeps
    one version per distinct file, so a best saved at the last step is one version with both aliases."""
    done = state.step
    best_step = (state.best or {}).get("step")
    aliases = (["best"] if best or best_step == done else []) + (["latest"] if final else []) + [f"step-{done}"]
    metadata = {"step": done, "kimg": state.kimg, "metrics": state.last_eval,
                "best": state.best, "run_id": run_id, "shards_manifest_digest": manifest_digest,
                "model": {"resolution": cfg.model.resolution, "nz": cfg.model.nz, "ngf": cfg.model.ngf,
                          "ndf": cfg.model.ndf}}
    if cfg.wandb.log_model and (best or final):
        tracker.artifact(f"generator-{run_id}", "model", {SNAPSHOT: saved / SNAPSHOT}, aliases, metadata)
    if cfg.wandb.log_checkpoints and checkpoints:
        files = {str(f.relative_to(saved)): f for f in sorted(saved.rglob("*")) if f.is_file()}
        tracker.artifact(f"checkpoint-{run_id}", "checkpoint", files, aliases, metadata)


def _log_best_again(tracker: Tracker, cfg: Config, run_id: str, manifest_digest: str) -> None:
    """Rank 0, at every start: the best checkpoint's generator as the model artifact, again. wandb
    writes an artifact's record only once it has staged the file, so a best found shortly before a
    kill can be missing from the killed segment's run file; logging it again costs one more version
    only where it was lost."""
    best = RunLayout.of(cfg.run_dir).best
    if not (tracker.use_wandb and cfg.wandb.log_model and (best / MARKER).is_file() and (best / SNAPSHOT).is_file()):
        return
    try:
        state = TrainerState.from_json((best / STATE_FILE).read_text())
    except (OSError, ValueError):
        return
    _log_artifacts(tracker, cfg, best, state, run_id, manifest_digest, best=True, final=False, checkpoints=False)


def _publish_generator(layout: RunLayout, saved: Path, best: bool) -> None:
    """run_dir/generator.safetensors: a copy of the best snapshot, or of the latest while no best exists.
    A regular save after a best leaves the copy as it is."""
    if best or not (layout.best / SNAPSHOT).is_file():
        try:
            atomic_write_bytes(layout.generator, (saved / SNAPSHOT).read_bytes())
        except OSError as exc:          # a convenience copy: the checkpoint holds the same file
            print(f"warning: could not update '{layout.generator}' ({exc.strerror}); "
                  f"'{saved / SNAPSHOT}' has the same weights", file=sys.stderr, flush=True)


def _eval_due(cfg: Config, progress: Progress, done: int) -> bool:
    """Whether step `done` carried the images seen past a multiple of eval.every_kimg (0: at the end only).
    Counted in images, so the cadence holds when a resumed run has another global batch."""
    every = round((cfg.eval.every_kimg or 0) * 1000, 6)
    return every > 0 and progress.images(done) // every > progress.images(done - 1) // every


def _evaluate(evaluator: Evaluator, nets: Nets, tracker: Tracker, trainer_state: TrainerState, done: int,
              progress: Progress) -> bool:
    """Collective. Log the EMA generator's metrics; True if they are the best so far by eval.best_by
    (in the direction the metric registry gives), which trainer_state then records."""
    values = evaluator(nets.ema.module)
    trainer_state.last_eval = values
    tracker.scalars(done, {"kimg": progress.kimg(done), **values}, section="eval")
    key = evaluator.best_metric()
    best = trainer_state.best
    if key not in values or (best and best["metric"] == key and not metrics.better(key, values[key], best["value"])):
        return False
    trainer_state.best = {"metric": key, "value": values[key], "step": done, "metrics": values}
    return True


def _check_health(accelerator: Accelerator, totals: Totals, interval: Interval, cfg: Config) -> dict:
    """Raise, naming the step, if any rank saw a non-finite loss or gave up after too many skipped
    updates. A sync and a collective: call at log and checkpoint steps only. Returns `totals.read()`."""
    first_bad, gave_up = dist.all_min(accelerator, torch.stack([totals.first_bad, totals.gave_up]))
    health = totals.read()
    if first_bad < NO_STEP:
        means = [v / max(interval.n, 1) for v in health["stats"]]
        last_good = RunLayout.of(cfg.run_dir).latest_checkpoint()
        raise RunStopped(f"non-finite loss at step {first_bad} (loss_d={means[0]:.4g}, loss_g={means[1]:.4g}); "
                         f"stopping without saving. Last good checkpoint: {last_good or 'none'}")
    if gave_up < NO_STEP:
        limit = cfg.train.max_consecutive_skips
        raise RunStopped(f"{limit} updates in a row skipped for non-finite values, the last at step {gave_up}; "
                         "the run has diverged (last good checkpoint kept)")
    return health


def _record(state: TrainerState, accelerator: Accelerator, progress: Progress, done: int, counters: dict) -> None:
    """What a checkpoint of step `done` says about the run."""
    state.step, state.images_seen = done, progress.images(done)
    state.world_size, state.global_batch = accelerator.num_processes, progress.global_batch
    state.mixed_precision = accelerator.mixed_precision
    state.skipped_d, state.skipped_g, state.data_errors = (counters["skipped_d"], counters["skipped_g"],
                                                          counters["data_errors"])


def _counters(accelerator: Accelerator, health: dict, interval: Interval) -> dict:
    """Run totals for the metrics line and the checkpoint. Collective: data_errors is summed over ranks
    (skip counts agree on every rank already)."""
    errors = torch.tensor([float(interval.data_errors)], device=accelerator.device)
    total = int(accelerator.reduce(errors, reduction="sum").item())
    return {"skipped_d": health["skipped_d"], "skipped_g": health["skipped_g"], "data_errors": total}


def _log(accelerator, cfg, tracker, totals: Totals, interval: Interval, done: int, progress: Progress) -> None:
    """The only host-device syncs between log intervals."""
    health = _check_health(accelerator, totals, interval, cfg)
    means = (accelerator.reduce(totals.stats, reduction="mean") / max(interval.n, 1)).tolist()
    now = time.time()
    values = dict(zip(("loss_d", "loss_g", "d_real", "d_fake"), means))
    values.update(kimg=progress.kimg(done),
                  images_per_s=(done - interval.step) * progress.global_batch / max(now - interval.t, 1e-9),
                  **_counters(accelerator, health, interval))
    tracker.scalars(done, values)
    totals.stats.zero_()
    interval.t, interval.step, interval.n = now, done, 0


def _new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)
