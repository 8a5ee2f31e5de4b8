#!/usr/bin/env bash
# Runs as a node's holder inside its network, UTS and mount namespaces (started by up.sh):
# private /run and /dev/shm, the box's /etc files and home bound in, daemons started, then it
# waits, keeping the namespaces alive for `on` (nsenter).
set -euo pipefail
node=$1 BOX=$2
trap 'touch "$BOX/run/failed.$node"' ERR
hostname "$node"
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mount --bind "$BOX/etc/hosts" /etc/hosts
mount --bind "$BOX/etc/resolv.conf" /etc/resolv.conf
echo "$node" > "$BOX/run/hostname.$node"
mount --bind "$BOX/run/hostname.$node" /etc/hostname
mount --bind "$BOX/etc/slurm" /etc/slurm
# The shared home replaces /root; an interpreter installed under /root stays visible inside.
if [[ -n ${PYPREFIX:-} && $PYPREFIX == /root/* && -d $PYPREFIX ]]; then
    mkdir -p "$BOX/home/${PYPREFIX#/root/}"
    mount --bind "$PYPREFIX" "$BOX/home/${PYPREFIX#/root/}" 2>/dev/null || true
    mount -o remount,bind,ro "$BOX/home/${PYPREFIX#/root/}" 2>/dev/null || true
fi
mount --rbind "$BOX/home" /root
mkdir -p /run/munge /run/sshd
chown munge:munge /run/munge
chmod 755 /run/munge
setpriv --reuid=munge --regid=munge --init-groups munged --socket=/run/munge/munge.socket.2 \
    --pid-file=/run/munge/munged.pid --log-file="$BOX/log/munge/munged.$node.log" --seed-file="$BOX/munge/$node.seed"
/usr/sbin/sshd -f "$BOX/ssh/sshd_config" -h "$BOX/ssh/$node/ssh_host_ed25519_key" -E "$BOX/log/sshd.$node.log"
if [[ $node == node1 ]]; then
    slurmctld -i
fi
slurmd -N "$node"
touch "$BOX/run/ready.$node"
exec sleep infinity
