#!/usr/bin/env bash
# Bring up a cluster in a box under $1 (an empty scratch folder under /tmp): NODES network
# namespaces with their own hostname, two networks (eth0 "mgmt" 10.200.0.1N, eth1 "data"
# 10.200.0.21N), sshd + munged + slurmd on every node and slurmctld on node1.
#
# Network rule: nothing is created in the host's network namespace. The bridges live in their own
# namespace (PREFIX-sw), the nodes have no default route, so traffic goes only to loopback and to
# the box's own namespaces. Any failure tears everything down again (down.sh).
# Usage: up.sh BOX [NODES] ; env PREFIX (namespace prefix, default cb), PYPREFIX (the interpreter's
# install prefix, made visible under the nodes' /root).
set -euo pipefail
BOX=${1:?usage: up.sh BOX [NODES]}
NODES=${2:-2}
PREFIX=${PREFIX:-cb}
HERE=$(cd "$(dirname "$0")" && pwd)
trap 'rc=$?; if [[ $rc != 0 ]]; then echo "up.sh failed (line $LINENO, exit $rc): tearing down" >&2; bash "$HERE/down.sh" "$BOX" || true; fi' EXIT

chmod 755 "$BOX"  # munged runs as user munge and logs below it
mkdir -p "$BOX"/{etc/slurm,home/.ssh,log,run,slurm/ctld,slurm/d,ssh,munge,bin}
echo "$PREFIX" > "$BOX/prefix"
echo "$NODES" > "$BOX/nodes"
[[ -d /run/netns ]] || { mkdir -p /run/netns; touch "$BOX/created-run-netns"; }

# ---- network: switch namespace with two bridges, one namespace per node
sw=$PREFIX-sw
ip netns add "$sw"
ip -n "$sw" link set lo up
for br in br0 br1; do
    ip -n "$sw" link add "$br" type bridge
    ip -n "$sw" link set "$br" up
done
hosts="127.0.0.1 localhost"$'\n'
for i in $(seq 1 "$NODES"); do
    ns=$PREFIX-node$i
    ip netns add "$ns"
    ip -n "$sw" link add "n${i}a" type veth peer name eth0 netns "$ns"
    ip -n "$sw" link add "n${i}b" type veth peer name eth1 netns "$ns"
    ip -n "$sw" link set "n${i}a" master br0 up
    ip -n "$sw" link set "n${i}b" master br1 up
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null || true
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "10.200.0.1$i/25" dev eth0
    ip -n "$ns" addr add "10.200.0.21$i/25" dev eth1
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set eth1 up
    hosts+="10.200.0.1$i node$i"$'\n'"10.200.0.21$i node$i-data"$'\n'
done
printf '%s' "$hosts" > "$BOX/etc/hosts"
: > "$BOX/etc/resolv.conf"

# ---- ssh: one key pair for root (the shared "NFS home"), one host key per node
ssh-keygen -q -t ed25519 -N '' -f "$BOX/home/.ssh/id_ed25519"
cp "$BOX/home/.ssh/id_ed25519.pub" "$BOX/home/.ssh/authorized_keys"
cat > "$BOX/home/.ssh/config" <<CONF
Host node* 10.200.0.*
  User root
  IdentityFile ~/.ssh/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  ConnectTimeout 5
CONF
chmod 700 "$BOX/home" "$BOX/home/.ssh"; chmod 600 "$BOX/home/.ssh/"*
cat > "$BOX/ssh/sshd_config" <<CONF
Port 22
ListenAddress 0.0.0.0
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
StrictModes no
X11Forwarding no
PrintMotd no
PidFile /run/sshd.pid
AcceptEnv LANG LC_*
PermitUserEnvironment no
Subsystem sftp /usr/lib/openssh/sftp-server
CONF
for i in $(seq 1 "$NODES"); do
    mkdir -p "$BOX/ssh/node$i"
    ssh-keygen -q -t ed25519 -N '' -f "$BOX/ssh/node$i/ssh_host_ed25519_key"
done

# ---- SLURM
nodelines=""
# CPUs=4: up to four 1-task-per-node jobs share the nodes (test_sbatch.py runs its four cases at once)
for i in $(seq 1 "$NODES"); do
    nodelines+="NodeName=node$i NodeAddr=10.200.0.1$i CPUs=4 RealMemory=1000 State=UNKNOWN"$'\n'
done
cat > "$BOX/etc/slurm/slurm.conf" <<CONF
ClusterName=box
SlurmctldHost=node1(10.200.0.11)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# requeued jobs become eligible again only after cred_expire (default 120 s; 5 is the least slurmctld takes)
AuthInfo=cred_expire=5
# a job that becomes eligible by time (a requeued one) starts at the next scheduling pass, not at
# submission: the default passes are every 30 s (backfill) and 60 s (main)
SchedulerParameters=bf_interval=1,sched_interval=1
StateSaveLocation=$BOX/slurm/ctld
SlurmdSpoolDir=$BOX/slurm/d/%n
SlurmctldPidFile=$BOX/run/slurmctld.pid
SlurmdPidFile=$BOX/run/slurmd.%n.pid
SlurmctldLogFile=$BOX/log/slurmctld.log
SlurmdLogFile=$BOX/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
# 300, not 60: test_mpirun.py unplugs node2's eth0 (SLURM's network) for about a minute; with 60
# slurmctld marked node2 DOWN meanwhile and the next SLURM test waited ~15 s for it to register again
SlurmdTimeout=300
MessageTimeout=10
${nodelines}PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP
CONF
printf 'CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n' > "$BOX/etc/slurm/cgroup.conf"
[[ -f /etc/slurm/plugstack.conf ]] && cp /etc/slurm/plugstack.conf "$BOX/etc/slurm/" || true
mkdir -p "$BOX/log/munge"; chown munge:munge "$BOX/munge" "$BOX/log/munge"

# ---- one holder process per node: own UTS + mount namespace, daemons started inside
for i in $(seq 1 "$NODES"); do
    ip netns exec "$PREFIX-node$i" unshare --uts --mount --propagation private \
        bash "$HERE/node-init.sh" "node$i" "$BOX" > "$BOX/log/node$i.init.log" 2>&1 &
    echo $! > "$BOX/run/holder.node$i"
done
# Wait for every node's daemons: sshd answering on its mgmt address, slurmd registered.
deadline=$((SECONDS + 60))
for i in $(seq 1 "$NODES"); do
    until [[ -f $BOX/run/ready.node$i ]]; do
        if (( SECONDS > deadline )); then echo "node$i did not come up: $(tail -5 "$BOX/log/node$i.init.log")" >&2; exit 1; fi
        if [[ -f $BOX/run/failed.node$i ]]; then echo "node$i failed: $(tail -5 "$BOX/log/node$i.init.log")" >&2; exit 1; fi
        sleep 0.1
    done
done
until bash "$HERE/on" "$BOX" node1 sinfo -h -o '%T' 2>/dev/null | grep -qx idle; do
    if (( SECONDS > deadline )); then echo "SLURM nodes not idle: $(bash "$HERE/on" "$BOX" node1 sinfo 2>&1 | tail -3)" >&2; exit 1; fi
    sleep 0.3
done
echo "box up: $NODES nodes in $BOX"
