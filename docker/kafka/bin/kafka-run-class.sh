#!/usr/bin/env bash
# Runs a class of Kafka's jars on Debian's Java, as the distribution's script of this name does.
# KAFKA_HEAP_OPTS and KAFKA_OPTS are read the same way; the tools log warnings to stderr.
set -euo pipefail
# shellcheck disable=SC2086  # the options are lists of words, as in the distribution's script
exec java ${KAFKA_HEAP_OPTS:--Xmx256m} ${KAFKA_OPTS:-} -Djava.awt.headless=true \
    "-Dlog4j2.configurationFile=${KAFKA_LOG4J_CONFIG:-/opt/kafka/config/tools-log4j2.properties}" \
    -cp '/opt/kafka/libs/*' "$@"
