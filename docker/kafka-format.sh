#!/bin/sh
# The compose files' one-shot `kafka-format` service: formats this PC's Kafka node before its
# first start, with the admin principal's SCRAM login written into the storage (a secured
# node refuses every client without a login, so the first login cannot be made over the
# network). Runs in the Kafka image, on the node's volume, with the node's id, voters and
# ports from the environment. A node already formatted is left as it is, and so is its data;
# the node's own start formats nothing then.
#
# Environment: CLUSTER_ID, NODE_ID, VOTERS (id@host:port,...), KAFKA_PORT,
# KAFKA_CONTROLLER_PORT, KAFKA_SECURE (empty: no login is written). The admin's password is
# /keys/admin.password (docker/install-keys.sh put it there).
set -eu

props=/tmp/format.properties
# Only what the storage tool reads: the node's identity, its quorum and its log directory.
cat > "$props" <<EOF
process.roles=broker,controller
node.id=$NODE_ID
controller.quorum.voters=$VOTERS
controller.listener.names=CONTROLLER
listeners=EXTERNAL://:$KAFKA_PORT,CONTROLLER://:$KAFKA_CONTROLLER_PORT
listener.security.protocol.map=EXTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=EXTERNAL
log.dirs=/var/lib/kafka/data
EOF
if [ -f /var/lib/kafka/data/meta.properties ]; then
    echo "kafka-format: node $NODE_ID is formatted already; its data is kept"
    exit 0
fi
if [ -n "${KAFKA_SECURE:-}" ]; then
    password="$(head -n 1 /keys/admin.password)"
    exec /opt/kafka/bin/kafka-storage.sh format -t "$CLUSTER_ID" -c "$props" \
        --add-scram "SCRAM-SHA-512=[name=admin,password=$password]"
fi
exec /opt/kafka/bin/kafka-storage.sh format -t "$CLUSTER_ID" -c "$props"
