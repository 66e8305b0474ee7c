#!/bin/sh
# The compose files' one-shot `keys` service: this PC's certificates (./certs) and secrets
# (./secrets, made by scripts/deploy.sh on the first `up`) copied into two volumes, owned by
# the user that reads them. A bind mount keeps the host's owner and mode, so a key readable
# only by its owner on the host could not be read by the services' users in the containers.
#
#   /keys        the services (uid 10001, docker/Dockerfile): ca.crt, every NAME.crt and
#                NAME.key of ./certs but the CA's key, every kafka-NAME.password of ./secrets
#   /kafka-keys  the Kafka node (uid 1000, the Kafka image's appuser): ca.crt, kafka.pem (its
#                key and certificate), admin.password, jaas.conf (the node's own login) and
#                client.properties (the admin login for the image's tools: health check, topics)
#   /central-data  (when mounted) the audit key both Centrals share, beside the database
#
# KAFKA_SECURE empty (SECURE=0 in network_config.py): nothing is required, and
# client.properties says PLAINTEXT. Files a PC does not have are simply not copied; a service
# that needs one says which when it starts.
set -eu

APP=10001
KAFKA=1000
missing=""
need() { [ -r "$1" ] || missing="$missing $1"; }

if [ -n "${KAFKA_SECURE:-}" ]; then
    need /certs/ca.crt
    need /certs/kafka.crt
    need /certs/kafka.key
    need /secrets/kafka-admin.password
fi
if [ -n "$missing" ]; then
    echo "keys: missing (copy them from PC2, where scripts/deploy.sh pc2 up made them):$missing" >&2
    exit 1
fi

# Certificates are public (Kafka UI, another user, reads ca.crt); keys and passwords are not.
install -d -o "$APP" -g "$APP" -m 0755 /keys
install -d -o "$KAFKA" -g "$KAFKA" -m 0750 /kafka-keys
for file in /certs/*.crt; do
    [ -f "$file" ] && install -o "$APP" -g "$APP" -m 0444 "$file" /keys/
done
for file in /certs/*.key /secrets/kafka-*.password; do
    [ -f "$file" ] || continue
    [ "$file" = /certs/ca.key ] && continue  # the CA's key signs certificates: it stays on PC2
    install -o "$APP" -g "$APP" -m 0400 "$file" /keys/
done

if [ -r /certs/ca.crt ]; then
    install -o "$KAFKA" -g "$KAFKA" -m 0400 /certs/ca.crt /kafka-keys/ca.crt
fi
if [ -r /certs/kafka.key ] && [ -r /certs/kafka.crt ]; then
    # Kafka reads a PEM key store as the private key followed by its certificate.
    cat /certs/kafka.key /certs/kafka.crt > /kafka-keys/kafka.pem
    chown "$KAFKA:$KAFKA" /kafka-keys/kafka.pem
    chmod 0400 /kafka-keys/kafka.pem
fi
password=""
if [ -r /secrets/kafka-admin.password ]; then
    password="$(head -n 1 /secrets/kafka-admin.password)"
    case "$password" in
        *[!A-Za-z0-9_-]*|"") echo "keys: secrets/kafka-admin.password: one line of A-Z a-z 0-9 - _" >&2; exit 1 ;;
    esac
    install -o "$KAFKA" -g "$KAFKA" -m 0400 /secrets/kafka-admin.password /kafka-keys/admin.password
fi
umask 077
# The node's login to the other nodes (inter-broker SCRAM), read by the JVM (KAFKA_OPTS).
cat > /kafka-keys/jaas.conf <<EOF
KafkaServer {
    org.apache.kafka.common.security.scram.ScramLoginModule required
    username="admin"
    password="$password";
};
EOF
if [ -n "${KAFKA_SECURE:-}" ]; then
    cat > /kafka-keys/client.properties <<EOF
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$password";
ssl.truststore.type=PEM
ssl.truststore.location=/keys/ca.crt
# The health check asks every node: a TLS handshake and a login each, slow on a busy PC.
request.timeout.ms=15000
EOF
else
    echo "security.protocol=PLAINTEXT" > /kafka-keys/client.properties
fi
chown "$KAFKA:$KAFKA" /kafka-keys/jaas.conf /kafka-keys/client.properties

if [ -d /central-data ]; then
    # The volume's own directory too: made by this container first, it would stay root's,
    # and Central could not create its database in it (found by the run on Podman).
    chown "$APP:$APP" /central-data
    chmod 0750 /central-data
    if [ -r /secrets/central.audit-key ]; then
        install -o "$APP" -g "$APP" -m 0600 /secrets/central.audit-key /central-data/ev_charging.db.audit-key
    fi
fi
echo "keys: installed $(ls /keys | wc -l) files for the services, Kafka's $( [ -n "${KAFKA_SECURE:-}" ] && echo secured || echo plain)"
