"""Upload a run_dir's offline W&B segments as the one W&B run they belong to.

Every start of an offline run writes its own `run_dir/wandb/offline-run-*` folder (W&B ignores
`resume` offline), all with the run_dir's one run id. A start that resumed from a checkpoint at step S
logs steps S+1 on again, which the segment before it may already hold (it ran past its last
checkpoint before it was killed). W&B keeps a run's history in step order and drops a row whose step
is not above the last one it has, so uploaded as they are, the replayed rows of the later segment
would be the ones lost. The plan therefore cuts each segment at the step where a later segment took
over (a copy of its run file without those rows, in run_dir/wandb/sync/), and uploads the segments
in the order they were started, to the one run id, with one `wandb sync` call.

Nothing in the run folder is executed: its run files are read as protobuf records, and the `wandb`
command gets the folder paths as arguments, never through a shell.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dcgan_dist.errors import UserError, say
from dcgan_dist.fsutil import atomic_write_text
from dcgan_dist.run.layout import RunLayout, valid_run_id
from dcgan_dist.report import wandb_file

SYNCED = "synced.json"


@dataclass
class Segment:
    folder: Path               # run_dir/wandb/offline-run-YYYYMMDD_HHMMSS-ID
    run_file: Path
    run_id: str
    start_step: int            # the step this start resumed from (0: a fresh start)
    steps: list[int]           # the history rows' steps, in file order
    project: str
    entity: str
    keep_upto: Optional[int] = None     # drop rows past this step (a later segment logs them again)

    @property
    def kept(self) -> list[int]:
        return [s for s in self.steps if self.keep_upto is None or s <= self.keep_upto]


def read_segment(folder: Path) -> Optional[Segment]:
    files = sorted(folder.glob("run-*.wandb"))
    if len(files) != 1:
        return None
    records = wandb_file.read_records(files[0])
    runs = [r.run for r in records if wandb_file.kind(r) == "run"]
    if not runs:
        return None
    steps = [wandb_file.history_step(r) for r in records if wandb_file.kind(r) == "history"]
    start = wandb_file.config(files[0]).get("run", {}).get("start_step")
    if not isinstance(start, int) or isinstance(start, bool):
        start = max(min(steps, default=1) - 1, 0)       # run folders older than the start_step entry
    return Segment(folder, files[0], runs[0].run_id, start, steps, runs[0].project, runs[0].entity)


def plan(run_dir: Path, include_synced: bool = False) -> tuple[str, list[Segment], list[str]]:
    """The run id, its segments to upload in start order (cut where a later one takes over), and one
    note per folder left out."""
    wandb_dir = RunLayout(run_dir).wandb
    folders = sorted(wandb_dir.glob("offline-run-*")) if wandb_dir.is_dir() else []
    if not folders:
        raise UserError(f"'{wandb_dir}': no offline W&B runs (offline-run-*) to upload")
    notes, segments = [], []
    for folder in folders:                  # the names start with the start time, so sorted = started
        seg = read_segment(folder)
        if seg is None:
            notes.append(f"{folder.name}: no readable run file, left out")
        else:
            segments.append(seg)
    id_file = RunLayout(run_dir).wandb_id
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not valid_run_id(run_id):
        if not segments:
            raise UserError(f"'{wandb_dir}': none of its offline runs has a readable run file")
        run_id = segments[-1].run_id
    for seg in [s for s in segments if s.run_id != run_id]:
        notes.append(f"{seg.folder.name}: another run id ({seg.run_id}, not {run_id}), left out")
    segments = [s for s in segments if s.run_id == run_id]
    later_start = None
    for seg in reversed(segments):
        seg.keep_upto = later_start
        if seg.steps:                       # a start killed before its first row replaces nothing
            later_start = seg.start_step if later_start is None else min(later_start, seg.start_step)
    synced = set() if include_synced else _synced(wandb_dir, run_id)
    for seg in [s for s in segments if s.folder.name in synced]:
        notes.append(f"{seg.folder.name}: uploaded before, left out (--all uploads it again)")
    return run_id, [s for s in segments if s.folder.name not in synced], notes


def _synced(wandb_dir: Path, run_id: str) -> set[str]:
    try:
        record = json.loads((wandb_dir / SYNCED).read_text())
        return set(record["segments"]) if record.get("run_id") == run_id else set()
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def cut(seg: Segment, out_root: Path) -> Path:
    """The folder to upload for `seg`: itself, or a copy whose run file lacks the rows past keep_upto.
    Media files are linked, not copied."""
    if seg.keep_upto is None or seg.kept == seg.steps:
        return seg.folder
    out = out_root / seg.folder.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if (seg.folder / "files").is_dir():
        shutil.copytree(seg.folder / "files", out / "files", copy_function=_link_or_copy)
    header, payloads = wandb_file.read_payloads(seg.run_file)
    kept = [p for p in payloads if not _replayed(wandb_file.parse(p), seg.keep_upto)]
    wandb_file.write_payloads(out / seg.run_file.name, header, kept)
    return out


def _replayed(rec, keep_upto: int) -> bool:
    return wandb_file.kind(rec) == "history" and wandb_file.history_step(rec) > keep_upto


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def sync_command(wandb_cli: str, run_id: str, folders: list[Path], project: str, entity: str) -> list[str]:
    """One `wandb sync` for all segments: with --id, wandb uploads several folders of one run in the
    order they were started. Versions before the Go-based sync need --append to add to a run."""
    cmd = [wandb_cli, "sync", "--id", run_id, "--project", project]
    if entity:
        cmd += ["--entity", entity]
    if "--append" in _help(wandb_cli):
        cmd.append("--append")
    return cmd + [str(f) for f in folders]


def _help(wandb_cli: str) -> str:
    try:
        return subprocess.run([wandb_cli, "sync", "--help"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"--wandb '{wandb_cli}': cannot run it ({exc})") from None


def missing_steps(run_dir: Path, segments: list[Segment]) -> list[int]:
    """Training steps that metrics.jsonl has and no segment will upload: rows wandb still held in
    memory when a kill -9 came (it writes its run file every 2 s), before the checkpoint the next start
    resumed from."""
    from dcgan_dist.report.plots import read_rows

    train, _ = read_rows(RunLayout(run_dir).metrics)
    logged = {row["step"] for row in train if "loss_d" in row and isinstance(row.get("step"), int)}
    first = min((s.start_step for s in segments), default=0)
    uploaded = {step for seg in segments for step in seg.kept}
    return sorted(s for s in logged - uploaded if s > first)


def _spans(steps: list[int]) -> str:
    spans, start = [], None
    for i, s in enumerate(steps):
        start = s if start is None else start
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            spans.append(f"{start}" if start == s else f"{start}-{s}")
            start = None
    return ", ".join(spans)


def describe(run_id: str, segments: list[Segment], notes: list[str], missing: list[int] = ()) -> str:
    lines = [f"W&B run {run_id}: {len(segments)} segment(s) to upload, in this order"]
    for seg in segments:
        kept, dropped = seg.kept, len(seg.steps) - len(seg.kept)
        span = f"steps {kept[0]}-{kept[-1]}" if kept else "no rows"
        cut_note = f", {dropped} row(s) past step {seg.keep_upto} left to the next segment" if dropped else ""
        lines.append(f"  {seg.folder.name}: from step {seg.start_step}, {len(kept)} row(s), {span}{cut_note}")
    if missing:
        lines.append(f"  note: the W&B files lost the rows of step(s) {_spans(list(missing))} (held in memory by "
                     "wandb when the job was killed); metrics.jsonl has them")
    return "\n".join(lines + [f"  skipped {n}" for n in notes])


def sync(args) -> int:
    """launch/wandb_sync.py's work, given its flags (run_dir, wandb, dry_run, all, project, entity)."""
    from dcgan_dist.report.track import has_wandb_credentials

    run_dir = args.run_dir
    if not run_dir.is_dir():
        raise UserError(f"'{run_dir}': no such run folder")
    run_id, segments, notes = plan(run_dir, args.all)
    partial = any("uploaded before" in n for n in notes)        # then the gaps cannot be told
    print(describe(run_id, segments, notes, [] if partial else missing_steps(run_dir, segments)), flush=True)
    if not segments:
        print("nothing to upload", flush=True)
        return 0
    cli = args.wandb or shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    wandb_dir, project, entity = RunLayout(run_dir).wandb, args.project or segments[-1].project, \
        args.entity or segments[-1].entity
    if args.dry_run:
        print("dry run: would run: " + " ".join(sync_command(cli, run_id, [s.folder for s in segments], project,
                                                             entity)), flush=True)
        return 0
    if not has_wandb_credentials():
        raise UserError("no W&B API key (set WANDB_API_KEY or run `wandb login`); nothing was uploaded")
    cmd = sync_command(cli, run_id, [cut(seg, wandb_dir / "sync") for seg in segments], project, entity)
    print("running: " + " ".join(cmd), flush=True)
    code = subprocess.run(cmd).returncode
    if code != 0:
        say("error", f"wandb sync exited with {code}; nothing is marked as uploaded, so rerun to try again")
        return code
    done = _synced(wandb_dir, run_id) | {s.folder.name for s in segments}
    atomic_write_text(wandb_dir / SYNCED, json.dumps({"run_id": run_id, "segments": sorted(done)}, indent=1) + "\n")
    return 0
