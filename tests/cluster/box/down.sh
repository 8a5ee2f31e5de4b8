#!/usr/bin/env bash
# Tear down the box under $1: every process in the box's namespaces, the namespaces, /run/netns
# if up.sh created it. Safe to run twice and after a failed up.sh.
BOX=${1:?usage: down.sh BOX}
PREFIX=$(cat "$BOX/prefix" 2>/dev/null || echo cb)
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-(node[0-9]+|sw)$"); do
    for round in 1 2 3; do
        pids=$(ip netns pids "$ns" 2>/dev/null)
        [[ -z $pids ]] && break
        kill -9 $pids 2>/dev/null
        sleep 0.2
    done
done
for f in "$BOX"/run/holder.*; do
    [[ -f $f ]] && kill -9 "$(cat "$f")" 2>/dev/null
done
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-(node[0-9]+|sw)$"); do
    ip netns del "$ns" 2>/dev/null
done
if [[ -f $BOX/created-run-netns ]] && [[ -z $(ls -A /run/netns 2>/dev/null) ]]; then
    umount /run/netns 2>/dev/null; rmdir /run/netns 2>/dev/null
    rm -f "$BOX/created-run-netns"
fi
exit 0
