#!/usr/bin/env bash
# Apache Kafka 4.1.1 (KRaft, each node broker and controller in one process) for development,
# tests and `make run`, from jars resolved through Maven Central.
#
#   scripts/kafka.sh start [PORT]   one node, in the background; returns once clients connect
#   scripts/kafka.sh stop  [PORT]   stop it and delete its data
#   scripts/kafka.sh jars           only resolve the broker jars (CI pre-fetch)
#
#   scripts/kafka.sh cluster start N [BASE_PORT]      N nodes, a KRaft quorum of N voters, on
#                                                     ports BASE_PORT .. BASE_PORT+N-1 (default
#                                                     19092); prints the bootstrap list. With 3
#                                                     or more nodes every topic has replication
#                                                     factor 3 and min.insync.replicas 2
#   scripts/kafka.sh cluster stop [BASE_PORT]         stop every node, delete the data
#   scripts/kafka.sh cluster stop-node I [BASE_PORT]  stop node I (1..N), keeping its data
#   scripts/kafka.sh cluster start-node I [BASE_PORT] start node I again on its data
#
# Environment: EV_KAFKA_CACHE (jar cache), EV_KAFKA_RUN_DIR (runtime dir: per port, or per
# cluster with a sub-directory a node), EV_KAFKA_LISTEN_HOST (bind host, default 127.0.0.1),
# EV_KAFKA_ADVERTISED_HOST, EV_KAFKA_START_TIMEOUT (seconds, default 90), EV_KAFKA_KEEP_DATA=1
# (stop keeps the data, start restarts on it), EV_KAFKA_REPLICA_FETCH_WAIT_MS (default 20; Kafka's
# own default is 500: bench/transactions.py compares them), JAVA, PYTHON.
#
# EV_KAFKA_SECURE_DIR=DIR starts the nodes secured (docs/security.md, "Kafka"): clients connect
# with TLS and a SCRAM-SHA-512 login (SASL_SSL), the nodes talk to each other with mutual TLS,
# and the broker's own authorizer allows only what ACLs grant. DIR holds ca.crt, kafka.crt and
# kafka.key (the nodes' certificate, valid for the listen host: scripts/make-certs.py --server
# kafka=...) and kafka-admin.password, the password of the `admin` principal that is written
# into the storage when a node is formatted; `python -m EV_Central kafka-access` makes them
# and grants every other principal its ACLs.
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


LISTEN_HOST="${EV_KAFKA_LISTEN_HOST:-127.0.0.1}"
# The host that clients (and the controllers) dial: a wildcard bind is not dialable.
CONNECT_HOST="$LISTEN_HOST"; [[ "$LISTEN_HOST" == 0.0.0.0 ]] && CONNECT_HOST=127.0.0.1
ADV_HOST="${EV_KAFKA_ADVERTISED_HOST:-$CONNECT_HOST}"
JOPTS=(-Xms256m -Xmx512m -Djava.awt.headless=true)

SECURE="${EV_KAFKA_SECURE_DIR:-}"
if [[ -n "$SECURE" ]]; then
    for f in ca.crt kafka.crt kafka.key kafka-admin.password; do
        [[ -r "$SECURE/$f" ]] || die "EV_KAFKA_SECURE_DIR=$SECURE has no readable $f"
    done
    SECURE="$(cd "$SECURE" && pwd)"
fi

# The admin principal's password: one line of letters, digits, '-' and '_' (it goes into a
# JAAS line and the storage tool's --add-scram as it is).
secure_password() {
    local password; password="$(head -n 1 "$SECURE/kafka-admin.password")"
    [[ "$password" =~ ^[A-Za-z0-9_-]{16,}$ ]] \
        || die "$SECURE/kafka-admin.password: 16 or more of A-Z a-z 0-9 - _ on one line"
    echo "$password"
}

# --- one node -----------------------------------------------------------------------------------

# The pid in DIR's pid file, if that process is still our broker (guards against pid reuse).
node_pid() {
    local pid; pid="$(cat "$1/kafka.pid" 2>/dev/null || true)"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' \
        && echo "$pid"
}

free_port() {
    "$PYTHON" -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$LISTEN_HOST"
}

# A cluster id is 16 random bytes in URL-safe base64; one starting with '-' would be read as
# an option by the storage tool, so draw again in that case.
new_cluster_id() {
    "$PYTHON" -c 'import base64, uuid
while (c := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
    pass
print(c)'
}

# start_node DIR NODE_ID PORT CONTROLLER_PORT VOTERS CLUSTER_ID NODES: write the node's
# configuration, format its storage (unless its data is kept) and launch it in the background.
start_node() {
    local dir=$1 id=$2 port=$3 cport=$4 voters=$5 cid=$6 nodes=$7
    local data="$dir/data" log="$dir/broker.log" replicas=1 isr=1
    # Three copies, two of them in sync for a write to count: one node may fail.
    (( nodes >= 3 )) && { replicas=3; isr=2; }
    mkdir -p "$dir"
    # A fresh node each start, unless EV_KAFKA_KEEP_DATA=1 asks to restart the old one
    # (tests that stop and restart a broker mid-run keep their topics and offsets).
    local keep=0; [[ "${EV_KAFKA_KEEP_DATA:-0}" == 1 && -f "$data/meta.properties" ]] && keep=1
    (( keep )) || rm -rf "$data"
    : > "$log"                # truncate so readiness never matches a previous run's line
    local client=PLAINTEXT controller=PLAINTEXT scram=()
    [[ -n "$SECURE" ]] && { client=SASL_SSL; controller=SSL; }
    cat > "$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
listeners=$client://$LISTEN_HOST:$port,CONTROLLER://$LISTEN_HOST:$cport
advertised.listeners=$client://$ADV_HOST:$port
inter.broker.listener.name=$client
controller.listener.names=CONTROLLER
listener.security.protocol.map=$client:$client,CONTROLLER:$controller
log.dirs=$data
num.partitions=1
default.replication.factor=$replicas
min.insync.replicas=$isr
offsets.topic.replication.factor=$replicas
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=$replicas
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$replicas
share.coordinator.state.topic.min.isr=$isr
group.initial.rebalance.delay.ms=0
# Central's lease group (docs/high-availability.md) notices a dead member after 3 s; the
# broker's default floor for a consumer's session timeout is 6 s.
group.min.session.timeout.ms=1000
auto.create.topics.enable=false
# A node that stops heartbeating to the controller loses its partitions' leadership after 4 s
# (9 s by default): the time a failed broker's partitions are unwritable.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000
# A follower asks its leader for new records again after at most 20 ms (500 ms by default).
# A transaction's commit markers reach the followers only with their next fetch, and the
# coordinator refuses the transactional id's next transaction until they have: with the
# default, each transactional id of an active Central could begin one every 0.3-1 s
# (docs/high-availability.md, "Measured").
replica.fetch.wait.max.ms=${EV_KAFKA_REPLICA_FETCH_WAIT_MS:-20}
EOF
    if [[ -n "$SECURE" ]]; then
        local password; password="$(secure_password)"
        # Kafka reads a PEM key store as the private key followed by its certificate.
        (umask 077; cat "$SECURE/kafka.key" "$SECURE/kafka.crt" > "$dir/kafka.pem")
        cat >> "$dir/server.properties" <<EOF
# Secured (EV_KAFKA_SECURE_DIR): TLS everywhere, SCRAM logins for clients, mutual TLS between
# the nodes (the controller listener cannot use SCRAM: its logins live in the metadata it
# serves), and nothing allowed that no ACL grants.
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$password";
ssl.keystore.type=PEM
ssl.keystore.location=$dir/kafka.pem
ssl.truststore.type=PEM
ssl.truststore.location=$SECURE/ca.crt
listener.name.controller.ssl.client.auth=required
# A node's certificate names it: CN=kafka is the principal User:kafka.
ssl.principal.mapping.rules=RULE:^CN=([^,]+),.*\$/\$1/,DEFAULT
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin;User:kafka
EOF
        scram=(--add-scram "SCRAM-SHA-512=[name=admin,password=$password]")
    fi
    # Kafka 4 logs through log4j2 (the old log4j 1.x log4j.properties is not read).
    # log4j-core parses the .properties format without extra jars; YAML would need jackson-yaml.
    cat > "$dir/log4j2.properties" <<EOF
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $log
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
    local jopts=("${JOPTS[@]}" "-Dlog4j2.configurationFile=$dir/log4j2.properties")
    (( keep )) || "$JAVA" "${jopts[@]}" -cp "$LIBS/*" kafka.tools.StorageTool format \
        -t "$cid" -c "$dir/server.properties" "${scram[@]}" >> "$log" 2>&1 \
        || { tail -n 40 "$log" >&2; die "storage format failed"; }
    # setsid: own session, so the broker survives the caller's terminal/process group.
    # All std streams are redirected so callers capturing our output never block on it.
    setsid nohup "$JAVA" "${jopts[@]}" -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" \
        < /dev/null >> "$log" 2>&1 &
    echo $! > "$dir/kafka.pid"
    echo "kafka.sh: starting node $id on $LISTEN_HOST:$port (controller $cport, pid $!), log: $log"
}

# wait_ready DIR...: until every node's log says it has started (a node needs a quorum).
wait_ready() {
    local deadline=$(( $(date +%s) + ${EV_KAFKA_START_TIMEOUT:-90} )) dir pid
    for dir in "$@"; do
        pid="$(cat "$dir/kafka.pid")"
        until grep -q 'Kafka Server started' "$dir/broker.log"; do
            if ! kill -0 "$pid" 2>/dev/null; then
                tail -n 40 "$dir/broker.log" >&2; rm -f "$dir/kafka.pid"
                die "broker exited during startup"
            fi
            if (( $(date +%s) >= deadline )); then
                tail -n 40 "$dir/broker.log" >&2; kill -KILL "$pid" 2>/dev/null || true
                rm -f "$dir/kafka.pid"
                die "broker not ready after ${EV_KAFKA_START_TIMEOUT:-90}s (killed it)"
            fi
            sleep 0.2
        done
    done
}

# stop_node DIR LABEL: SIGTERM (a clean shutdown hands its partitions over), SIGKILL after 20 s.
stop_node() {
    local dir=$1 label=$2 pid
    if pid="$(node_pid "$dir")"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "kafka.sh: broker pid $pid ignored SIGTERM for 20s, killing" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        echo "kafka.sh: stopped $label (pid $pid)"
    else
        echo "kafka.sh: no broker running as $label"
    fi
    rm -f "$dir/kafka.pid"
}

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

need_java() {
    ensure_jars
    command -v "$JAVA" >/dev/null || die "java not found (set JAVA=/path/to/java, JDK 17+)"
}

# --- a cluster ----------------------------------------------------------------------------------

# The nodes' controller ports and the cluster id live in CLUSTER/cluster.env, so that a node
# stopped alone starts again into the same quorum.
cluster_env() {
    [[ -f "$CLUSTER/cluster.env" ]] || die "no cluster in $CLUSTER (start one first)"
    # shellcheck disable=SC1091
    source "$CLUSTER/cluster.env"
    VOTERS=""
    local i
    # shellcheck disable=SC2153  # NODES and CPORTS come from cluster.env
    for i in $(seq "$NODES"); do VOTERS+="${VOTERS:+,}$i@$CONNECT_HOST:${CPORTS[i-1]}"; done
}

cluster_start() {
    local n=$1 i dirs=() bootstrap=""
    [[ "$n" =~ ^[1-9]$ ]] || die "a cluster has 1 to 9 nodes, not '$n'"
    for i in $(seq "$n"); do
        [[ -z "$(node_pid "$CLUSTER/node$i")" ]] \
            || die "node $i of the cluster on $BASE runs already; stop the cluster first"
    done
    local t0; t0="$(date +%s.%N)"
    mkdir -p "$CLUSTER"
    if [[ "${EV_KAFKA_KEEP_DATA:-0}" != 1 || ! -f "$CLUSTER/cluster.env" ]]; then
        local cports=()
        for i in $(seq "$n"); do cports+=("$(free_port)"); done
        printf 'NODES=%s\nCLUSTER_ID=%s\nCPORTS=(%s)\n' \
            "$n" "$(new_cluster_id)" "${cports[*]}" > "$CLUSTER/cluster.env"
    fi
    cluster_env
    for i in $(seq "$NODES"); do
        start_node "$CLUSTER/node$i" "$i" "$((BASE + i - 1))" "${CPORTS[i-1]}" "$VOTERS" \
            "$CLUSTER_ID" "$NODES"
        dirs+=("$CLUSTER/node$i")
        bootstrap+="${bootstrap:+,}$ADV_HOST:$((BASE + i - 1))"
    done
    wait_ready "${dirs[@]}"
    echo "kafka.sh: cluster of $NODES ready in $(elapsed "$t0")s: $bootstrap"
}

cluster_start_node() {
    local i=$1
    cluster_env
    (( i >= 1 && i <= NODES )) || die "the cluster has nodes 1 to $NODES, not $i"
    if [[ -n "$(node_pid "$CLUSTER/node$i")" ]]; then
        echo "kafka.sh: node $i runs already"; return
    fi
    EV_KAFKA_KEEP_DATA=1 start_node "$CLUSTER/node$i" "$i" "$((BASE + i - 1))" \
        "${CPORTS[i-1]}" "$VOTERS" "$CLUSTER_ID" "$NODES"
    wait_ready "$CLUSTER/node$i"
    echo "kafka.sh: node $i ready at $ADV_HOST:$((BASE + i - 1))"
}

cluster_stop_node() {
    local i=$1
    cluster_env
    (( i >= 1 && i <= NODES )) || die "the cluster has nodes 1 to $NODES, not $i"
    stop_node "$CLUSTER/node$i" "node $i on port $((BASE + i - 1))"
}

cluster_stop() {
    if [[ ! -f "$CLUSTER/cluster.env" ]]; then
        echo "kafka.sh: no cluster on $BASE"; return
    fi
    cluster_env
    # All at once: a node stopped last would wait in vain for a quorum to hand its partitions to.
    local i pids=()
    for i in $(seq "$NODES"); do
        pids+=("$(node_pid "$CLUSTER/node$i" || true)")
        [[ -z "${pids[i-1]}" ]] || kill -TERM "${pids[i-1]}" 2>/dev/null || true
    done
    for _ in $(seq 50); do
        local alive=0
        for i in "${pids[@]}"; do [[ -n "$i" ]] && kill -0 "$i" 2>/dev/null && alive=1; done
        (( alive )) || break
        sleep 0.2
    done
    for i in $(seq "$NODES"); do
        [[ -z "${pids[i-1]}" ]] || kill -KILL "${pids[i-1]}" 2>/dev/null || true
        rm -f "$CLUSTER/node$i/kafka.pid"
    done
    echo "kafka.sh: stopped the cluster of $NODES on $BASE"
    [[ "${EV_KAFKA_KEEP_DATA:-0}" == 1 ]] || rm -rf "$CLUSTER"
}

cluster() {
    local sub="${1:-}" arg="${2:-}"
    case "$sub" in
    start|stop-node|start-node) BASE="${3:-19092}" ;;
    stop) BASE="${2:-19092}" ;;
    *) echo "usage: $0 cluster {start N | stop | stop-node I | start-node I} [BASE_PORT]" >&2
       exit 2 ;;
    esac
    [[ "$BASE" =~ ^[0-9]+$ ]] || die "bad port: $BASE"
    CLUSTER="${EV_KAFKA_RUN_DIR:-${TMPDIR:-/tmp}/ev-kafka-cluster-$BASE}"
    if [[ "$sub" == *-node ]]; then [[ "$arg" =~ ^[0-9]+$ ]] || die "bad node number: '$arg'"; fi
    case "$sub" in
    start) need_java; cluster_start "$arg" ;;
    stop) cluster_stop ;;
    stop-node) cluster_stop_node "$arg" ;;
    start-node) need_java; cluster_start_node "$arg" ;;
    esac
}

# --- commands -----------------------------------------------------------------------------------

cmd="${1:-}"
if [[ "$cmd" == cluster ]]; then
    shift
    cluster "$@"
    exit 0
fi

PORT="${2:-9092}"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "bad port: $PORT"
RUN="${EV_KAFKA_RUN_DIR:-${TMPDIR:-/tmp}/ev-kafka-$PORT}"

case "$cmd" in
jars) ensure_jars; echo "kafka.sh: jars in $LIBS" ;;

start)
    if pid="$(node_pid "$RUN")"; then
        echo "kafka.sh: broker already running on port $PORT (pid $pid), log: $RUN/broker.log"
        exit 0
    fi
    t0="$(date +%s.%N)"
    need_java
    # KRaft needs a second listener for the controller quorum; only this node uses it.
    CPORT="$(free_port)"
    start_node "$RUN" 1 "$PORT" "$CPORT" "1@$CONNECT_HOST:$CPORT" "$(new_cluster_id)" 1
    wait_ready "$RUN"
    echo "kafka.sh: broker ready at $ADV_HOST:$PORT in $(elapsed "$t0")s"
    ;;

stop)
    stop_node "$RUN" "broker on port $PORT"
    [[ "${EV_KAFKA_KEEP_DATA:-0}" == 1 ]] || rm -rf "$RUN/data"
    ;;

*) echo "usage: $0 {start|stop} [PORT] | $0 jars | $0 cluster ..." >&2; exit 2 ;;
esac
