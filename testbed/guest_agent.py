"""A minimal QEMU guest agent for the test guest, in busybox sh, for user-data scripts.

``QGA_FUNCTION`` defines a shell function ``qga MODE [MOUNTPOINT]`` that finds the guest
agent's virtio port (the /dev/vportNpM whose /sys/class/virtio-ports/*/name is
org.qemu.guest_agent.0: scripts/build-test-images loads virtio_console) and serves libvirt's
requests on it forever (run it in the background). libvirt sends one JSON object per line
(src/qemu/qemu_agent.c): ``{"execute":"guest-sync", "arguments":{"id":N}}`` before every
command (answered ``{"return": N}``), then the command itself.

MODE ``ok``: answers guest-sync(-delimited), guest-ping, guest-info, guest-fsfreeze-status,
guest-fsfreeze-freeze (``fsfreeze --freeze MOUNTPOINT`` when one is given, prints
NODEAGENT-FROZEN) and guest-fsfreeze-thaw (prints NODEAGENT-THAWED); anything else is a
CommandNotFound error. MODE ``garbage``: holds the port open (libvirt sees an agent
connected) and answers every line with non-JSON noise, as a hostile guest may. MODE
``silent``: holds the port open and never answers.

The port reads EOF while no host client is connected (before libvirt connects, after it
drops the agent): the function keeps the port open and reads again after a pause, so the
guest stays "connected".
"""
from __future__ import annotations

QGA_FUNCTION = r"""
qga() {
    mode=$1 mnt=$2 dev=
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && dev=/dev/${p##*/}
    done
    [ -n "$dev" ] || { echo "NODEAGENT-QGA no port"; return 1; }
    exec 3<>"$dev" || return 1
    echo "NODEAGENT-QGA $mode on $dev"
    while true; do
        while read -r req <&3; do
            if [ "$mode" = silent ]; then continue; fi
            if [ "$mode" = garbage ]; then printf '}{ not json \001\377\n' >&3; continue; fi
            case "$req" in
            *'"guest-sync-delimited"'*)
                printf '\377{"return": %s}\n' "$(echo "$req" | sed -n 's/.*"id": *\([0-9]*\).*/\1/p')" >&3 ;;
            *'"guest-sync"'*)
                printf '{"return": %s}\n' "$(echo "$req" | sed -n 's/.*"id": *\([0-9]*\).*/\1/p')" >&3 ;;
            *'"guest-ping"'*) printf '{"return": {}}\n' >&3 ;;
            *'"guest-info"'*) printf '{"return": {"version": "nodeagent-test", "supported_commands": []}}\n' >&3 ;;
            *'"guest-fsfreeze-status"'*) printf '{"return": "%s"}\n' "${frozen:-thawed}" >&3 ;;
            *'"guest-fsfreeze-freeze"'*)
                if [ -z "$mnt" ] || fsfreeze --freeze "$mnt"; then
                    frozen=frozen
                    echo "NODEAGENT-FROZEN"
                    printf '{"return": 1}\n' >&3
                else
                    printf '{"error": {"class": "GenericError", "desc": "fsfreeze failed"}}\n' >&3
                fi ;;
            *'"guest-fsfreeze-thaw"'*)
                [ -n "$mnt" ] && [ "$frozen" = frozen ] && fsfreeze --unfreeze "$mnt"
                frozen=
                echo "NODEAGENT-THAWED"
                printf '{"return": 1}\n' >&3 ;;
            *) printf '{"error": {"class": "CommandNotFound", "desc": "not here"}}\n' >&3 ;;
            esac
        done
        sleep 0.2
    done
}
"""


def user_data(body: str, mode: str = "ok", mountpoint: str = "") -> str:
    """A user-data script: the responder defined, ``body`` (shell), then the responder
    started in the background in ``mode`` (the script itself then exits)."""
    return f"#!/bin/sh\n{QGA_FUNCTION}\n{body}\nqga {mode} {mountpoint} &\n"
