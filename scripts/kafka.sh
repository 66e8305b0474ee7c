#!/usr/bin/env bash
# Single-node Apache Kafka 4.1.1 (KRaft, combined broker+controller) for local tests.
#
#   scripts/kafka.sh start [PORT]   start in the background, return once clients can connect
#   scripts/kafka.sh stop  [PORT]   stop it and delete its data
#   scripts/kafka.sh jars           only resolve the broker jars (CI pre-fetch)
#
# Environment: EV_KAFKA_CACHE (jar cache), EV_KAFKA_RUN_DIR (per-port runtime dir),
# EV_KAFKA_LISTEN_HOST (bind host, default 127.0.0.1), EV_KAFKA_ADVERTISED_HOST,
# EV_KAFKA_START_TIMEOUT (seconds, default 90), EV_KAFKA_KEEP_DATA=1 (stop keeps the data,
# start restarts on it), JAVA, PYTHON.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$SCRIPT_DIR/kafka-pom.xml"
CACHE="${EV_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ev-charging/kafka-4.1.1}"
LIBS="$CACHE/libs"
JAVA="${JAVA:-java}"
PYTHON="${PYTHON:-python3}"

die() { echo "kafka.sh: $*" >&2; exit 1; }

# Resolve the jars from Maven Central into the cache. The marker holds the pom's hash,
# so editing the pom triggers a fresh resolve. Resolving into a temporary directory and
# renaming it keeps concurrent callers from ever seeing a half-filled libs dir.
ensure_jars() {
    local want; want="$(sha256sum "$POM" | cut -d' ' -f1)"
    [[ "$(cat "$LIBS/.resolved" 2>/dev/null || true)" == "$want" ]] && return 0
    command -v mvn >/dev/null || die "mvn not found (needed once to fetch the Kafka jars)"
    mkdir -p "$CACHE"
    local tmp; tmp="$(mktemp -d "$CACHE/libs.tmp.XXXXXX")"
    echo "kafka.sh: resolving Kafka jars into $LIBS" >&2
    if ! mvn -q -B -f "$POM" dependency:copy-dependencies -DincludeScope=runtime \
            -DoutputDirectory="$tmp" > "$tmp.log" 2>&1; then
        cat "$tmp.log" >&2; rm -rf "$tmp" "$tmp.log"; die "mvn failed"
    fi
    rm -f "$tmp.log"; echo "$want" > "$tmp/.resolved"; rm -rf "$LIBS"
    mv -T "$tmp" "$LIBS" 2>/dev/null || rm -rf "$tmp"   # lost a race: the winner's copy is fine
}

# Pid from the pid file if that process is still our broker (guards against pid reuse).
running_pid() {
    local pid; pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' \
        && echo "$pid"
}

cmd="${1:-}"; PORT="${2:-9092}"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "bad port: $PORT"
RUN="${EV_KAFKA_RUN_DIR:-${TMPDIR:-/tmp}/ev-kafka-$PORT}"
PIDFILE="$RUN/kafka.pid"; LOG="$RUN/broker.log"; DATA="$RUN/data"

case "$cmd" in
jars) ensure_jars; echo "kafka.sh: jars in $LIBS" ;;

start)
    if pid="$(running_pid)"; then
        echo "kafka.sh: broker already running on port $PORT (pid $pid), log: $LOG"; exit 0
    fi
    t0="$(date +%s.%N)"
    ensure_jars
    command -v "$JAVA" >/dev/null || die "java not found (set JAVA=/path/to/java, JDK 17+)"
    LISTEN_HOST="${EV_KAFKA_LISTEN_HOST:-127.0.0.1}"
    # The host that clients (and the controller itself) dial: a wildcard bind is not dialable.
    CONNECT_HOST="$LISTEN_HOST"; [[ "$LISTEN_HOST" == 0.0.0.0 ]] && CONNECT_HOST=127.0.0.1
    ADV_HOST="${EV_KAFKA_ADVERTISED_HOST:-$CONNECT_HOST}"
    # KRaft needs a second listener for the controller quorum; only this node uses it.
    CPORT="$("$PYTHON" -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$LISTEN_HOST")"

    mkdir -p "$RUN"
    # A fresh cluster each start, unless EV_KAFKA_KEEP_DATA=1 asks to restart the old one
    # (tests that stop and restart the broker mid-run keep their topics and offsets).
    KEEP=0; [[ "${EV_KAFKA_KEEP_DATA:-0}" == 1 && -f "$DATA/meta.properties" ]] && KEEP=1
    (( KEEP )) || rm -rf "$DATA"
    : > "$LOG"                # truncate so readiness never matches a previous run's line
    cat > "$RUN/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$CONNECT_HOST:$CPORT
listeners=PLAINTEXT://$LISTEN_HOST:$PORT,CONTROLLER://$LISTEN_HOST:$CPORT
advertised.listeners=PLAINTEXT://$ADV_HOST:$PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DATA
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
EOF
    # Kafka 4 logs through log4j2 (the old log4j 1.x log4j.properties is not read).
    # log4j-core parses the .properties format without extra jars; YAML would need jackson-yaml.
    cat > "$RUN/log4j2.properties" <<EOF
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $LOG
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
# Kafka dumps every config value (~300 lines) several times at startup.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
EOF
    JOPTS=(-Xms256m -Xmx512m -Djava.awt.headless=true "-Dlog4j2.configurationFile=$RUN/log4j2.properties")
    # A cluster id is 16 random bytes in URL-safe base64; one starting with '-' would be
    # read as an option by the storage tool, so draw again in that case.
    cid="$("$PYTHON" -c 'import base64, uuid
while (c := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
    pass
print(c)')"
    (( KEEP )) || "$JAVA" "${JOPTS[@]}" -cp "$LIBS/*" kafka.tools.StorageTool format \
        -t "$cid" -c "$RUN/server.properties" >> "$LOG" 2>&1 \
        || { tail -n 40 "$LOG" >&2; die "storage format failed"; }

    # setsid: own session, so the broker survives the caller's terminal/process group.
    # All std streams are redirected so callers capturing our output never block on it.
    setsid nohup "$JAVA" "${JOPTS[@]}" -cp "$LIBS/*" kafka.Kafka "$RUN/server.properties" \
        < /dev/null >> "$LOG" 2>&1 &
    pid=$!
    echo "$pid" > "$PIDFILE"
    echo "kafka.sh: starting broker on $LISTEN_HOST:$PORT (controller $CPORT, pid $pid), log: $LOG"

    deadline=$(( $(date +%s) + ${EV_KAFKA_START_TIMEOUT:-90} ))
    until grep -q 'Kafka Server started' "$LOG"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 40 "$LOG" >&2; rm -f "$PIDFILE"; die "broker exited during startup"
        fi
        if (( $(date +%s) >= deadline )); then
            tail -n 40 "$LOG" >&2; kill -KILL "$pid" 2>/dev/null || true; rm -f "$PIDFILE"
            die "broker not ready after ${EV_KAFKA_START_TIMEOUT:-90}s (killed it)"
        fi
        sleep 0.2
    done
    printf 'kafka.sh: broker ready at %s:%s in %.1fs\n' "$ADV_HOST" "$PORT" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')"
    ;;

stop)
    if pid="$(running_pid)"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "kafka.sh: broker pid $pid ignored SIGTERM for 20s, killing" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        echo "kafka.sh: stopped broker on port $PORT (pid $pid)"
    else
        echo "kafka.sh: no broker running on port $PORT"
    fi
    rm -f "$PIDFILE"
    [[ "${EV_KAFKA_KEEP_DATA:-0}" == 1 ]] || rm -rf "$DATA"
    ;;

*) echo "usage: $0 {start|stop} [PORT] | $0 jars" >&2; exit 2 ;;
esac
