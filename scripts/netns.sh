#!/usr/bin/env bash
# Simulated PCs for multi-host runs: three Linux network namespaces joined by a bridge.
#
#   scripts/netns.sh up   [PREFIX]   create PREFIX-pc1, PREFIX-pc2, PREFIX-pc3 (and PREFIX-br)
#   scripts/netns.sh down [PREFIX]   stop what runs in them and delete them
#   scripts/netns.sh cut  PC [PREFIX]  take PC (pc1|pc2|pc3) off the network: its bridge port down
#   scripts/netns.sh mend PC [PREFIX]  put it back
#   scripts/netns.sh netem PC SPEC [PREFIX]  loss and/or delay on PC's link, both ways, as
#                                    tc netem's words: "loss 20%", "delay 200ms 50ms loss 5%"
#   scripts/netns.sh clear PC [PREFIX]  end it (prints how many packets it dropped and delayed)
#   scripts/netns.sh status [PREFIX]
#   scripts/netns.sh clean-stale     delete every evt<PID>-* or evc<PID>-* set (the multi-host
#                                    tests', the chaos tool's) and evp<PID> namespace (the compose
#                                    run's, scripts/podman-setup.sh) whose PID no longer runs
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
# The multi-host tests (tests/multihost) call this script with PREFIX evt<pytest pid>, the chaos
# tool (tools/chaos --net) with evc<its pid>.
#
# `netem` is netem's job done in user space, because the kernels this project is tested on have
# no sch_netem (`tc qdisc ... netem` says "Specified qdisc kind is unknown"): iptables sends what
# the PC's eth0 sends and receives to NFQUEUE 0 of the PC, where `python -m tools.netem` (run in
# the PC, with $PYTHON, default python3) drops or holds each packet. Traffic inside the PC (its
# lo) is untouched. A second `netem` on a PC replaces the first. Needs iptables (iptables-legacy
# where iptables is the nft one: this kernel has no nft queue); its state and log are kept in
# ${TMPDIR:-/tmp}/ev-netns/.
set -euo pipefail

die() { echo "netns.sh: $*" >&2; exit 1; }

PCS=(pc1 pc2 pc3)
SUBNET="${EV_NETNS_SUBNET:-10.231.0}"
[[ "$SUBNET" =~ ^10\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "EV_NETNS_SUBNET must look like 10.X.Y"

exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }

STATE="${TMPDIR:-/tmp}/ev-netns"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

iptables_cmd() {
    # NFQUEUE through iptables-nft needs the kernel's nft queue, which it may lack: legacy first.
    command -v iptables-legacy || command -v iptables \
        || die "iptables not found (apt-get install iptables)"
}

# The pid in BASE.pid, if that process is still a netem program (guards against pid reuse).
netem_pid() {
    local pid; pid="$(cat "$1.pid" 2>/dev/null || true)"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'tools\.netem' \
        && echo "$pid"
}

# clear_netem PREFIX PC: take PC's link out of its queue and stop its netem; print what it did.
clear_netem() {
    local ns="$1-$2" base="$STATE/$1-$2.netem" ipt pid
    if exists "$ns" && ipt="$(iptables_cmd)"; then
        ip netns exec "$ns" "$ipt" -w -D INPUT -i eth0 -j EVNETEM 2>/dev/null || true
        ip netns exec "$ns" "$ipt" -w -D OUTPUT -o eth0 -j EVNETEM 2>/dev/null || true
        ip netns exec "$ns" "$ipt" -w -F EVNETEM 2>/dev/null || true
        ip netns exec "$ns" "$ipt" -w -X EVNETEM 2>/dev/null || true
    fi
    if pid="$(netem_pid "$base")"; then
        kill -TERM "$pid" 2>/dev/null || true   # it lets the packets it holds go, then ends
        # Its last line, not its exit: once ended it may stay a zombie of init's for a while.
        for _ in $(seq 50); do
            grep -q 'netem: done' "$base.log" 2>/dev/null || ! kill -0 "$pid" 2>/dev/null && break
            sleep 0.05
        done
        kill -KILL "$pid" 2>/dev/null || true
        grep 'netem: done' "$base.log" 2>/dev/null | tail -n 1 || true
    fi
    rm -f "$base.pid"
}

netem() {
    local prefix="$1" pc="$2" spec="$3" ns="$1-$2" base="$STATE/$1-$2.netem" ipt pid
    exists "$ns" || die "$ns does not exist"
    ipt="$(iptables_cmd)"
    clear_netem "$prefix" "$pc" > /dev/null
    mkdir -p "$STATE"
    # shellcheck disable=SC2086  # the spec is netem's words, split on purpose
    (cd "$ROOT" && exec ip netns exec "$ns" "$PYTHON" -m tools.netem --queue 0 $spec) \
        < /dev/null > "$base.log" 2>&1 &
    pid=$!
    echo "$pid" > "$base.pid"
    for _ in $(seq 100); do
        grep -q 'netem: ready' "$base.log" && break
        kill -0 "$pid" 2>/dev/null \
            || { cat "$base.log" >&2; rm -f "$base.pid"; die "netem did not start"; }
        sleep 0.1
    done
    grep -q 'netem: ready' "$base.log" \
        || { clear_netem "$prefix" "$pc" > /dev/null; die "netem not ready in 10 s"; }
    # --queue-bypass: were the program gone, packets would pass instead of being dropped.
    if ! { ip netns exec "$ns" "$ipt" -w -N EVNETEM \
        && ip netns exec "$ns" "$ipt" -w -A EVNETEM -j NFQUEUE --queue-num 0 --queue-bypass \
        && ip netns exec "$ns" "$ipt" -w -I INPUT -i eth0 -j EVNETEM \
        && ip netns exec "$ns" "$ipt" -w -I OUTPUT -o eth0 -j EVNETEM; }; then
        clear_netem "$prefix" "$pc" > /dev/null
        die "could not send $ns's traffic to NFQUEUE with $ipt"
    fi
    echo "netns.sh: $ns netem: $spec"
}

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
    rm -f "$STATE/$prefix"-pc[123].netem.*
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
[[ -n "$cmd" ]] || die "usage: $0 up|down|status [PREFIX] | cut|mend|clear PC [PREFIX]" \
    "| netem PC SPEC [PREFIX] | clean-stale"
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
            if netem_pid "$STATE/$ns.netem" > /dev/null; then
                echo "$ns: $(grep 'netem: ready' "$STATE/$ns.netem.log")"
            fi
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
netem)
    PC="$(pc_arg "${2:-}")"; SPEC="${3:-}"; PREFIX="${4:-evnet}"
    [[ "$PREFIX" =~ ^[A-Za-z0-9_]{1,20}$ ]] || die "bad prefix: $PREFIX"
    [[ "$SPEC" =~ ^[a-z0-9.%\ ]+$ ]] \
        || die "SPEC is netem's words, e.g. \"loss 20%\" or \"delay 200ms 50ms\""
    netem "$PREFIX" "$PC" "$SPEC"
    ;;
clear)
    PC="$(pc_arg "${2:-}")"; PREFIX="${3:-evnet}"
    [[ "$PREFIX" =~ ^[A-Za-z0-9_]{1,20}$ ]] || die "bad prefix: $PREFIX"
    clear_netem "$PREFIX" "$PC"
    echo "netns.sh: $PREFIX-$PC netem cleared"
    ;;
clean-stale)
    # Namespaces of a crashed test, chaos or compose run whose PID is gone:
    # ev(t|c)<PID>-(pc1|pc2|pc3|br), and the compose run's one evp<PID>.
    stale='^ev[tc][0-9]+-(pc[123]|br)$|^evp[0-9]+$'
    for ns in $(ip netns list | awk '{print $1}' | grep -E "$stale" || true); do
        pid="${ns#ev?}"; pid="${pid%%-*}"
        kill -0 "$pid" 2>/dev/null && continue
        stop_pids "$ns"
        ip netns del "$ns" && echo "netns.sh: removed stale $ns"
        rm -f "$STATE/$ns.netem".*
    done
    ;;
*) die "unknown command: $cmd" ;;
esac
