#!/usr/bin/env bash
# Run the whole network on this machine without Docker (what `make run` / `make stop` call).
#
#   scripts/run-local.sh start   Kafka, Central (:5000, admin :8002), CPs CP001-CP003 and the
#                                driver (:8001) and site (:8003) dashboards
#   scripts/run-local.sh stop    stop all of them
#
# Environment: KAFKA_PORT (9092), CENTRAL_PORT (5000), HTTP_PORT (8002), CPS ("CP001 CP002
# CP003"), SPEED (60: the engines' simulated time runs 60 times faster, so the 10 s demo supply
# is 10 simulated minutes and a ticket of kWh; 1 for real time), PYTHON (.venv/bin/python).
# Logs and pids go to .run/.
set -euo pipefail
cd "$(dirname "$0")/.."

KAFKA_PORT="${KAFKA_PORT:-9092}"
CENTRAL_PORT="${CENTRAL_PORT:-5000}"
HTTP_PORT="${HTTP_PORT:-8002}"
DRIVER_PORT="${DRIVER_PORT:-8001}"
SITE_PORT="${SITE_PORT:-8003}"
CPS="${CPS:-CP001 CP002 CP003}"
SPEED="${SPEED:-60}"
PY="${PYTHON:-.venv/bin/python}"
RUN=.run
BROKER="127.0.0.1:$KAFKA_PORT"
export EV_KAFKA_RUN_DIR="$PWD/$RUN/kafka"

launch() {  # name, then the command; stdin from /dev/null, output to .run/NAME.log
    local name=$1; shift
    nohup "$@" < /dev/null > "$RUN/$name.log" 2>&1 &
    echo $! > "$RUN/$name.pid"
}

wait_http() {
    for _ in $(seq 150); do
        "$PY" - "$1" <<'PY' && return 0
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=1)
except Exception:
    sys.exit(1)
PY
        sleep 0.2
    done
    echo "run-local: $1 did not answer; see the logs in $RUN/" >&2
    return 1
}

start() {
    mkdir -p "$RUN"
    scripts/kafka.sh start "$KAFKA_PORT"
    "$PY" init_db.py --db "$RUN/ev_charging.db"
    launch central "$PY" -m EV_Central --port "$CENTRAL_PORT" --http-port "$HTTP_PORT" \
        --broker "$BROKER" --db "$RUN/ev_charging.db" --console log --demo
    wait_http "http://127.0.0.1:$HTTP_PORT/healthz"
    local n=0 site_secrets=""
    for cp in $CPS; do
        n=$((n + 1))
        site_secrets="$site_secrets${site_secrets:+,}$cp=demo-secret-$cp"
        local engine_port=$((6100 + n))
        launch "engine-$cp" "$PY" -m EV_CP_E --broker "$BROKER" \
            --listen "127.0.0.1:$engine_port" --auto-plug 2 --auto-unplug 10 \
            --speed "$SPEED" --secret "demo-secret-$cp" --journal "$RUN/engine-$cp.journal"
        launch "monitor-$cp" "$PY" -m EV_CP_M --engine "127.0.0.1:$engine_port" \
            --central "127.0.0.1:$CENTRAL_PORT" --cp-id "$cp" --broker "$BROKER" \
            --secret "demo-secret-$cp"
    done
    launch driver-dashboard "$PY" -m EV_Driver dashboard --broker "$BROKER" --http-port "$DRIVER_PORT"
    # The site dashboard shows the health samples these CPs' monitors seal (demo secrets).
    launch site-dashboard "$PY" -m EV_CP_M dashboard --broker "$BROKER" --http-port "$SITE_PORT" \
        --cp-secrets "$site_secrets"
    wait_http "http://127.0.0.1:$DRIVER_PORT/healthz"
    wait_http "http://127.0.0.1:$SITE_PORT/healthz"
    cat <<MSG

The EV charging network is running on this machine:
  Kafka           $BROKER
  Central         monitors on :$CENTRAL_PORT
  admin panel     http://127.0.0.1:$HTTP_PORT/    (JSON: /api/cps, /api/sessions, /healthz)
  driver app      http://127.0.0.1:$DRIVER_PORT/    (log in with a demo account below)
  site monitor    http://127.0.0.1:$SITE_PORT/
  charging points $CPS (they plug in 2 s after authorisation and unplug after 10 s)
  simulated time  $SPEED times faster than real time, marked ×$SPEED on the dashboards
                  (SPEED=1 make run for real time)
Logs are in $RUN/ (tail -f $RUN/central.log).

Drive a supply from another terminal (it asks for user1's password, pass1):
  $PY -m EV_Driver --broker $BROKER --driver-id user1 --cp CP001

Stop or resume a CP:
  EV_ADMIN_PASSWORD=admin $PY -m EV_Central ctl --central 127.0.0.1:$HTTP_PORT stop CP002

Demo accounts (demo only): user1/pass1 (150.00 €), user2/pass2 (200.00 €), user3/pass3 (75.50 €).
Stop everything with: make stop
MSG
}

stop() {
    shopt -s nullglob
    for pidfile in "$RUN"/*.pid; do
        pid=$(cat "$pidfile")
        kill -TERM "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
    scripts/kafka.sh stop "$KAFKA_PORT"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
