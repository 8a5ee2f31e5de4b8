#!/usr/bin/env bash
# Container entrypoint.
#   sshd     start a key-only sshd as this (non-root) user on $SSH_PORT (default 2222) in the
#            foreground, so a pdsh/DeepSpeed launcher on another node can start ranks here.
#            Mount the cluster's public key(s) at ~/.ssh/authorized_keys.
#   anything else is exec'd (default: bash).
set -euo pipefail

if [[ ${1:-} == sshd ]]; then
    dir=$HOME/.ssh
    mkdir -p "$dir"
    chmod 700 "$dir"
    if [[ ! -s $dir/authorized_keys ]]; then
        echo "error: $dir/authorized_keys is missing or empty: mount the launching node's public key there (-v key.pub:$dir/authorized_keys:ro)" >&2
        exit 2
    fi
    # A non-root sshd cannot read /etc/ssh host keys, so it keeps its own in ~/.ssh.
    if [[ ! -f $dir/ssh_host_ed25519_key ]]; then
        ssh-keygen -q -t ed25519 -N '' -f "$dir/ssh_host_ed25519_key"
    fi
    # UsePAM=no: PAM needs root; password logins are off in sshd_config.d/ds_relora.conf anyway.
    exec /usr/sbin/sshd -D -e -p "${SSH_PORT:-2222}" -h "$dir/ssh_host_ed25519_key" \
        -o PidFile="$dir/sshd.pid" -o UsePAM=no
fi
exec "$@"
