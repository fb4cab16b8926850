#!/usr/bin/env bash
# Start a real single-node Slurm (Debian 12, Slurm 22.05) on this machine, as root. Idempotent:
# a Slurm that already answers with an idle or busy node is left as it is.
# Exit 0: ready; 3: this machine cannot run it (not root, not Debian); anything else: failed.
set -euo pipefail
if command -v sinfo >/dev/null && timeout 10 sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then echo "slurm.sh: not root, cannot install Slurm" >&2; exit 3; fi
if ! command -v slurmctld >/dev/null; then
  command -v apt-get >/dev/null || { echo "slurm.sh: no apt-get (not Debian)" >&2; exit 3; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
host=$(hostname -s)
mkdir -p /etc/munge /run/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm
[ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /run/munge && chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=drpflows
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName=$host CPUs=$(nproc) RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  if sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then sinfo; exit 0; fi
  sleep 1
done
echo "slurm.sh: Slurm did not come up; see /var/log/slurm/" >&2
exit 1
