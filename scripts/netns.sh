#!/usr/bin/env bash
# Simulated PCs for multi-host runs: three Linux network namespaces joined by a bridge.
#
#   scripts/netns.sh up   [PREFIX]   create PREFIX-pc1, PREFIX-pc2, PREFIX-pc3 (and PREFIX-br)
#   scripts/netns.sh down [PREFIX]   stop what runs in them and delete them
#   scripts/netns.sh cut  PC [PREFIX]  take PC (pc1|pc2|pc3) off the network: its bridge port down
#   scripts/netns.sh mend PC [PREFIX]  put it back
#   scripts/netns.sh status [PREFIX]
#   scripts/netns.sh clean-stale     delete every evt<PID>-* set whose PID no longer runs
#
# PREFIX defaults to "evnet". The bridge lives in a fourth namespace, PREFIX-br, so nothing is
# added to the root namespace and deleting the namespaces removes every veth and the bridge.
# Each PC has `lo` up and `eth0` = ${EV_NETNS_SUBNET:-10.231.0}.N/24 (pc1 .1, pc2 .2, pc3 .3):
# the PCs reach each other and nothing else (no default route, no address outside the subnet).
#
# Run something on a PC (needs root), e.g. Kafka and Central on PC2, then the driver on PC1:
#   sudo ip netns exec evnet-pc2 env EV_KAFKA_LISTEN_HOST=10.231.0.2 \
#       EV_KAFKA_RUN_DIR=/tmp/evnet-kafka scripts/kafka.sh start 9092
#   sudo ip netns exec evnet-pc2 .venv/bin/python -m EV_Central --broker 10.231.0.2:9092
#   sudo ip netns exec evnet-pc1 .venv/bin/python -m EV_Driver --broker 10.231.0.2:9092 \
#       --driver-id user1 --cp CP001
# (Ports inside a namespace never clash with the machine's own; give Kafka a run dir of its own
# all the same, since kafka.sh keys its pid file by port.) `down` ends each process still in
# the namespaces, by pid from `ip netns pids`: SIGTERM, then SIGKILL after 5 s.
# The multi-host tests (tests/multihost) call this script with PREFIX evt<pytest pid>.
set -euo pipefail

die() { echo "netns.sh: $*" >&2; exit 1; }

PCS=(pc1 pc2 pc3)
SUBNET="${EV_NETNS_SUBNET:-10.231.0}"
[[ "$SUBNET" =~ ^10\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "EV_NETNS_SUBNET must look like 10.X.Y"

exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }

# Every process in namespace $1, ended by pid: TERM, a grace period, then KILL.
stop_pids() {
    local ns="$1" pids
    exists "$ns" || return 0
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    [[ -z "$pids" ]] && return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 50); do
        [[ -z "$(ip netns pids "$ns" 2>/dev/null || true)" ]] && return 0
        sleep 0.1
    done
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    if [[ -n "$pids" ]]; then
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
    fi
    for _ in $(seq 30); do
        [[ -z "$(ip netns pids "$ns" 2>/dev/null || true)" ]] && return 0
        sleep 0.1
    done
    echo "netns.sh: processes still in $ns: $(ip netns pids "$ns" | tr '\n' ' ')" >&2
}

down() {
    local prefix="$1" ns
    for ns in "${PCS[@]/#/$prefix-}" "$prefix-br"; do
        stop_pids "$ns"
        if exists "$ns"; then
            ip netns del "$ns" || echo "netns.sh: could not delete $ns" >&2
        fi
    done
}

up() {
    local prefix="$1" br="$1-br" i=1 pc ns
    for ns in "${PCS[@]/#/$prefix-}" "$br"; do
        exists "$ns" && die "$ns exists already (scripts/netns.sh down $prefix)"
    done
    # Undo a half-built set if any step fails.
    trap 'down "$prefix"' ERR
    ip netns add "$br"
    ip netns exec "$br" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null || true
    ip netns exec "$br" sysctl -qw net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true
    ip -n "$br" link set lo up
    ip -n "$br" link add br0 type bridge
    ip -n "$br" link set br0 up
    for pc in "${PCS[@]}"; do
        ns="$prefix-$pc"
        ip netns add "$ns"
        # IPv4 only: no IPv6 link-local chatter (router solicitations) on the bridge.
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null || true
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true
        ip -n "$ns" link set lo up
        # The veth is born in the bridge namespace; its peer goes straight into the PC.
        ip -n "$br" link add "$pc" type veth peer name eth0 netns "$ns"
        ip -n "$br" link set "$pc" master br0
        ip -n "$br" link set "$pc" up
        ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        i=$((i + 1))
    done
    trap - ERR
    echo "netns.sh: up: $prefix-pc1 $SUBNET.1, $prefix-pc2 $SUBNET.2, $prefix-pc3 $SUBNET.3 (bridge in $br)"
}

pc_arg() {
    local pc="${1:-}"
    [[ " ${PCS[*]} " == *" $pc "* ]] || die "PC must be one of: ${PCS[*]}"
    echo "$pc"
}

cmd="${1:-}"
[[ -n "$cmd" ]] || die "usage: $0 up|down|status [PREFIX] | cut|mend PC [PREFIX] | clean-stale"
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces)"
command -v ip >/dev/null || die "ip (iproute2) not found"

case "$cmd" in
up | down | status)
    PREFIX="${2:-evnet}"
    [[ "$PREFIX" =~ ^[A-Za-z0-9_]{1,20}$ ]] || die "bad prefix: $PREFIX"
    case "$cmd" in
    up) up "$PREFIX" ;;
    down) down "$PREFIX"; echo "netns.sh: down: $PREFIX" ;;
    status)
        for ns in "${PCS[@]/#/$PREFIX-}"; do
            exists "$ns" || { echo "$ns: absent"; continue; }
            echo "$ns: $(ip -n "$ns" -br addr show eth0) pids: $(ip netns pids "$ns" | tr '\n' ' ')"
        done
        exists "$PREFIX-br" && ip -n "$PREFIX-br" -br link show master br0
        ;;
    esac
    ;;
cut | mend)
    PC="$(pc_arg "${2:-}")"; PREFIX="${3:-evnet}"
    exists "$PREFIX-br" || die "$PREFIX-br does not exist"
    state=down; [[ "$cmd" == mend ]] && state=up
    ip -n "$PREFIX-br" link set "$PC" "$state"
    echo "netns.sh: $PREFIX-$PC link $state"
    ;;
clean-stale)
    # Namespaces of a crashed test run: evt<PID>-(pc1|pc2|pc3|br) whose PID is gone.
    for ns in $(ip netns list | awk '{print $1}' | grep -E '^evt[0-9]+-(pc[123]|br)$' || true); do
        pid="${ns#evt}"; pid="${pid%%-*}"
        kill -0 "$pid" 2>/dev/null && continue
        stop_pids "$ns"
        ip netns del "$ns" && echo "netns.sh: removed stale $ns"
    done
    ;;
*) die "unknown command: $cmd" ;;
esac
