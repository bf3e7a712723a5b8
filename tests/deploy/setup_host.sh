#!/usr/bin/env bash
# Start what the deployment tests (tests/test_deploy_*.py) need, on this one Debian machine, as root:
# a Docker engine, a CPU base image to build docker/Dockerfile on, and a two-node Slurm cluster on
# loopback. Idempotent: what already runs is left alone. `make test-deploy` runs this, then the tests.
set -euo pipefail
[[ "$(id -u)" == 0 ]] || { echo "error: tests/deploy/setup_host.sh needs root (apt-get, dockerd, slurmd)" >&2; exit 2; }

STATE=/var/lib/dcgan-dist-deploy
mkdir -p "$STATE"

need=()
for pkg in docker.io debootstrap slurm-wlm munge; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "deploy: apt-get install ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Docker: overlay2 where the kernel has it (a build then takes seconds), else vfs, which copies the
# whole image for every Dockerfile step (about 45 s each here). No bridge or iptables: host network only.
start_dockerd() {
  nohup dockerd --storage-driver="$1" --data-root="$STATE/docker-$1" --iptables=false --bridge=none \
    >"$STATE/dockerd.log" 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  pkill -x dockerd || true
  sleep 2
  return 1
}
if ! docker info >/dev/null 2>&1; then
  echo "deploy: starting dockerd" >&2
  start_dockerd overlay2 || start_dockerd vfs \
    || { echo "error: dockerd did not start; see $STATE/dockerd.log" >&2; exit 1; }
fi

# Munge and Slurm: two slurmd on 127.0.0.1, one CPU each, in one partition.
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
if ! pgrep -x munged >/dev/null; then
  mkdir -p /run/munge /var/log/munge && chown munge:munge /run/munge /var/log/munge
  munged --force 2>/dev/null || true           # it warns, and may return 1, about root-owned folders
  sleep 1
  pgrep -x munged >/dev/null || { echo "error: munged did not start" >&2; exit 1; }
fi
host="$(hostname -s)"
grep -qE '^127\.0\.0\.1[[:space:]].*\bn1\b' /etc/hosts || echo "127.0.0.1 n1 n2" >>/etc/hosts
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=dcgan
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/var/run/slurmd-%n.pid
SlurmctldPidFile=/var/run/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
JobRequeue=1
ReturnToService=2
KillWait=60
MpiDefault=none
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=1 RealMemory=10000
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=1 RealMemory=10000
PartitionName=cpu Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
pgrep -x slurmctld >/dev/null || slurmctld
for node in n1 n2; do
  mkdir -p "/var/spool/slurmd/$node"
  pgrep -f "slurmd -N $node" >/dev/null || slurmd -N "$node"
done
for _ in $(seq 30); do
  [[ "$(sinfo -h -o '%t' 2>/dev/null | sort -u)" == idle ]] && break
  scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
  sleep 1
done
sinfo -h -o '%t' | grep -qx idle || { echo "error: the Slurm nodes are not idle: $(sinfo 2>&1)" >&2; exit 1; }

# The CPU base for docker build: Debian + Python 3.11 venv at /opt/venv + a CPU torch wheel (small,
# unlike the CUDA build, and vfs copies every layer whole). Made once per wheel.
wheel="$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -n 1 || true)"
if [[ -z "$wheel" ]]; then
  echo "deploy: no CPU torch wheel in /opt/wheels: the Docker tests will skip" >&2
  exit 0
fi
tag="dcgan-dist-testbase:$(basename "$wheel" | sed -E 's/^torch-([^-]+)-.*/\1/; s/\+/-/')"
if ! docker image inspect "$tag" >/dev/null 2>&1; then
  root="$STATE/rootfs"
  rm -rf "$root"
  mirror="$(grep -hoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n 1 || true)"
  echo "deploy: debootstrap bookworm from ${mirror:-http://deb.debian.org/debian} (about 2 min)" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
    "${mirror:-http://deb.debian.org/debian}" >"$STATE/debootstrap.log" 2>&1
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
  cp "$wheel" "$root/tmp/"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # A clean environment: this host's pip settings (local indexes, find-links) do not exist in there.
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$root" python3 -m venv /opt/venv
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$root" /opt/venv/bin/pip install -q --no-cache-dir \
    --index-url https://pypi.org/simple "/tmp/$(basename "$wheel")"
  rm -f "$root/tmp/"*.whl
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$tag" >/dev/null
  rm -rf "$root"
fi
echo "$tag" >"$STATE/base-image"
echo "deploy: docker, slurm (n1, n2) and the base image $tag are ready" >&2
