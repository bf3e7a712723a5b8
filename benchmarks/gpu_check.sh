#!/usr/bin/env bash
# The GPU check: everything the GPU path needs measured, in one run of under 8 minutes on one H100.
#
#   benchmarks/gpu_check.sh [--device cuda|cpu]
#
#   1. tests     the `gpu` tests (pytest -m gpu): bf16 and fp16 runs, graph vs eager, exact resume, ...
#   2. step      train_throughput.py: legacy step -> each optimisation -> CUDA graph, batch 128/256/512,
#                bf16 and fp16, 300 timed steps per row
#   3. loader    data_throughput.py into GPU memory with the trainer's default worker count
#   4. train     an end-to-end `accelerate launch` run (loader, W&B offline, checkpoints), then a resume
#   5. scaling   scaling_model.py: 8 ranks' all-reduce cost against the measured step times
#   6. evaluate  launch/evaluate.py through eval_cost.py: FID-50k (50,000 fakes against the whole set) of the
#                run trained in part 4, its images/s and seconds
#   7. cpu       cpu_target.py: the plain `accelerate launch` on 2 of the host's cores, CUDA hidden, against
#                pytorch/examples' dcgan/main.py when $PEER_MAIN names a copy of it (never in this repo).
#                A GPU machine's host CPU may have AMX, which the CPU target needs.
#
# Every part runs even if an earlier one failed; the exit status is non-zero if any failed. Prints a
# summary table with the card's name; with $OUT set, writes gpu_check.json, the training metrics and
# logs.tar.gz (each part's log) there: few files, since a device run returns at most 8.
# --device cpu runs the same parts, small, so the script itself is tested without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda; ONLY=
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=${2:?}; shift 2 ;;
        --only) ONLY=${2:?}; shift 2 ;;      # internal: run one shell-function part under `timeout`
        *) echo "usage: $0 [--device cuda|cpu]" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
LOGS=${OUT:-$(mktemp -d)}
if [ -z "$ONLY" ]; then
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
fi
export WORK
export WANDB_SILENT=true PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ACCELERATE=("$PY" -m accelerate.commands.accelerate_cli launch)

if [ "$DEVICE" = cuda ]; then
    # 4,000 images: the peer's timed iterations 12..24 (3,072 images) stay in its first epoch
    IMAGES=4000; TPUT=(--device cuda --steps 300); LOADER_BATCHES=400
    TRAIN=(train.steps=600 train.log_every=100 train.ckpt_every=300 train.sample_every=300
           eval.num_images=500 eval.every_kimg=null); MORE=900
    CPU=(--steps 8 --peer-iterations 12)   # about 3.5 minutes on 2 Xeon cores: probe, profile, ours twice, peer
    EVAL=(--num 50000)
else
    IMAGES=300; TPUT=(--device cpu --steps 1 --batch-sizes 8 --precisions bf16 --variants legacy,eager)
    LOADER_BATCHES=20; MORE=6
    CPU=(--steps 1 --peer-iterations 2 --batch-size 64)
    TRAIN=(train.steps=4 train.log_every=2 train.ckpt_every=2 train.sample_every=4 data.batch_size=16
           model.ngf=16 model.ndf=16 data.shuffle_buffer=64 eval.num_images=32 eval.every_kimg=null)
    EVAL=(--num 32 --reals 32)
fi

PARTS=(); RESULTS=()
part() {   # part NAME TIMEOUT_S COMMAND...: run it, log it, time it, never stop the script
    local name=$1 limit=$2 t0 rc; shift 2
    echo "== $name: $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1; rc=$?
    tail -n 25 "$LOGS/$name.log"
    PARTS+=("$name"); RESULTS+=("$rc:$(( $(date +%s) - t0 ))")
    echo "== $name: exit $rc in $(( $(date +%s) - t0 )) s"
}

data() {
    "$PY" launch/make_synthetic.py --output "$WORK/syn" --num "$IMAGES" --seed 0 &&
    "$PY" launch/shard.py --input "$WORK/syn" --output "$WORK/shards" --resolution 64 --split train \
        --shard-size 200 --workers 4
}

train_and_resume() {
    local run=(launch/train.py --config configs/celeba64.yaml "data.shards=$WORK/shards" "run_dir=$WORK/run"
               wandb.mode=offline "${TRAIN[@]}")
    "${ACCELERATE[@]}" --num_processes 1 --mixed_precision bf16 "${run[@]}" || return 1
    test -f "$WORK/run/checkpoints/step-$(printf %08d "${TRAIN[0]#train.steps=}")/COMPLETE" || return 1
    "${ACCELERATE[@]}" --num_processes 1 --mixed_precision bf16 "${run[@]}" "train.steps=$MORE" || return 1
    ls "$WORK"/run/wandb/offline-run-*/run-*.wandb >/dev/null || return 1
    cp "$WORK/run/metrics.jsonl" "$LOGS/train_metrics.jsonl"
}

if [ -n "$ONLY" ]; then "$ONLY"; exit; fi

echo "gpu_check on $DEVICE, $(date -u +%Y-%m-%dT%H:%MZ); logs in $LOGS"
part data 120 "$0" --device "$DEVICE" --only data
# The gpu tests are mostly process start-up (torch, CUDA, W&B): in parallel where pytest-xdist is
# installed (the device image has it), they take about 1.5 minutes instead of over 4.
PARALLEL=(); "$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 4)
part tests 280 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${PARALLEL[@]}" tests/test_gpu.py
part step 180 "$PY" benchmarks/train_throughput.py "${TPUT[@]}"
part loader 60 "$PY" benchmarks/data_throughput.py --shards "$WORK/shards" --batch-size 128 \
    --batches "$LOADER_BATCHES" --device "$DEVICE"
part train 120 "$0" --device "$DEVICE" --only train_and_resume
tail -n 1 "$LOGS/step.log" >"$WORK/step.json"
part scaling 30 "$PY" benchmarks/scaling_model.py --throughput "$WORK/step.json"
part evaluate 240 "$PY" benchmarks/eval_cost.py --evaluate "$WORK/run" --shards "$WORK/shards" --threads 2 "${EVAL[@]}"
PEER=(); [ -f "${PEER_MAIN:-}" ] && PEER=(--peer-main "$PEER_MAIN" --dataroot "$WORK/syn/celeba")
part cpu 280 "$PY" benchmarks/cpu_target.py --shards "$WORK/shards" "${CPU[@]}" "${PEER[@]}"

"$PY" - "$LOGS" "$DEVICE" "${PARTS[@]}" -- "${RESULTS[@]}" <<'EOF'
import datetime, json, platform, subprocess, sys
from pathlib import Path

import torch

logs, device, rest = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
names, results = rest[:rest.index("--")], rest[rest.index("--") + 1:]

def last_json(name):
    try:
        return json.loads((logs / f"{name}.log").read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None

card = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
if device == "cuda" and torch.cuda.is_available():
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    card.update(name=torch.cuda.get_device_name(), nvidia_smi=smi, cudnn=torch.backends.cudnn.version())
else:
    card["name"] = platform.processor() or "cpu"
step, loader, scaling, cpu = last_json("step"), last_json("loader"), last_json("scaling"), last_json("cpu")
evaluate = last_json("evaluate")
rows = [json.loads(ln) for ln in (logs / "train_metrics.jsonl").read_text().splitlines()] \
    if (logs / "train_metrics.jsonl").is_file() else []
train = [r for r in rows if "images_per_s" in r]            # eval rows ("eval/fid", ...) have no rate
figures = {
    "step": lambda: "best {:,.0f} img/s ({variant}, {precision}, batch {batch})".format(
        max(r["images_per_s"] for r in step["results"]),
        **max(step["results"], key=lambda r: r["images_per_s"])),
    "loader": lambda: f"{loader['images_per_s']:,.0f} img/s into {device} memory, {loader['num_workers']} workers",
    "train": lambda: f"{train[-1]['images_per_s']:,.0f} img/s end to end at step {train[-1]['step']}, resumed",
    "scaling": lambda: f"batch/GPU for >= 90%: {scaling['smallest_batch_for_90pct']}",
    "evaluate": lambda: (f"{evaluate['images_per_s_per_rank']:,.0f} img/s; {evaluate['fakes']:,} fakes + "
                         f"{evaluate['reals_computed']:,} reals in {evaluate['seconds']:.0f} s, FID "
                         f"{next(iter(evaluate['results'].values()))['fid']:.2f}"),
    "cpu": lambda: f"{cpu['ours']['images_per_s']:,.0f} img/s on {len(cpu['cores'])} cores of {cpu['cpu']} ("
                   + ("no AMX" if not cpu["amx"] else "AMX, used" if cpu["onednn"].get("conv_uses_amx") else "AMX, unused")
                   + (f"), {cpu['ratio']}x the peer" if "ratio" in cpu else ")"),
}
summary = []
print(f"\ncard: {card.get('name')}  {card.get('nvidia_smi', '')}  torch {card['torch']}  CUDA {card['cuda']}")
print(f"{'part':<8} {'status':<6} {'seconds':>7}  figure")
for name, result in zip(names, results):
    rc, seconds = (int(x) for x in result.split(":"))
    try:
        figure = figures[name]() if name in figures else ""
    except Exception:  # noqa: BLE001 - a failed part has no figure
        figure = ""
    summary.append({"part": name, "ok": rc == 0, "exit": rc, "seconds": seconds, "figure": figure})
    print(f"{name:<8} {'ok' if rc == 0 else 'FAIL':<6} {seconds:>7}  {figure}")
out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "device": device,
       "card": card, "parts": summary, "step": step, "loader": loader, "train": train, "scaling": scaling,
       "evaluate": evaluate, "cpu": cpu}
(logs / "gpu_check.json").write_text(json.dumps(out, indent=1))
sys.exit(0 if all(s["ok"] for s in summary) else 1)
EOF
rc=$?
if [ -n "${OUT:-}" ]; then      # one archive of the part logs: a device run returns at most 8 files
    (cd "$LOGS" && tar -czf logs.tar.gz ./*.log && rm -f ./*.log)
fi
exit $rc
