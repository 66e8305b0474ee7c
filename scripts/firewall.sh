#!/usr/bin/env bash
# Open (or close) the TCP ports a PC serves to the others, on Linux: ufw when it is active,
# iptables otherwise. Run as root on that PC.
#
#   scripts/firewall.sh PC [--remove] [--dry-run]
#
#   PC   pc1 (driver dashboard), pc2 (Kafka, Kafka UI, Central monitors and admin),
#        pc3 (site dashboard), all
#
# The ports come from network_config.py (`python3 network_config.py --ports PC`), so an
# overridden port (KAFKA_PORT=19092 scripts/firewall.sh pc2) is the one opened. iptables
# rules do not survive a reboot unless saved (iptables-save, or the iptables-persistent
# package). Note: ports that Docker publishes are let in by Docker's own iptables rules,
# before ufw's; this script matters for hosts whose INPUT policy drops and for runs without
# Docker (make run, the services started by hand).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "firewall: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

PC="${1:-}"; shift || true
case "$PC" in pc1|pc2|pc3|all) ;; *) usage ;; esac
REMOVE=0; DRY=0
for arg in "$@"; do
    case "$arg" in --remove) REMOVE=1 ;; --dry-run) DRY=1 ;; *) usage ;; esac
done

PORTS="$("${PYTHON:-python3}" network_config.py --ports "$PC")" || die "network_config.py refused the settings"
COMMENT="EV charging $PC"
run() { if (( DRY )); then echo "+ $*"; else "$@"; fi; }

(( DRY )) || [[ $(id -u) -eq 0 ]] || die "run as root (sudo $0 $PC), or add --dry-run to see the commands"

if command -v ufw >/dev/null && ufw status 2>/dev/null | grep -q "^Status: active"; then
    for port in $PORTS; do
        if (( REMOVE )); then run ufw delete allow "$port/tcp"
        else run ufw allow "$port/tcp" comment "$COMMENT"; fi
    done
elif command -v iptables >/dev/null; then
    for port in $PORTS; do
        rule=(INPUT -p tcp --dport "$port" -m comment --comment "$COMMENT" -j ACCEPT)
        if (( REMOVE )); then
            while iptables -C "${rule[@]}" 2>/dev/null; do run iptables -D "${rule[@]}"; (( DRY )) && break; done
        elif (( DRY )) || ! iptables -C "${rule[@]}" 2>/dev/null; then
            run iptables -I "${rule[@]}"
        fi
    done
else
    die "neither ufw nor iptables found: open TCP $PORTS in this PC's firewall by hand"
fi
echo "firewall: $([[ $REMOVE == 1 ]] && echo closed || echo opened) TCP $PORTS for $PC$([[ $DRY == 1 ]] && echo ' (dry run)')"
