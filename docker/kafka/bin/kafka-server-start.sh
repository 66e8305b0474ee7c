#!/usr/bin/env bash
# The broker, logging to stdout; KAFKA_HEAP_OPTS as in the distribution (1 GiB by default).
export KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}"
export KAFKA_LOG4J_CONFIG="${KAFKA_LOG4J_CONFIG:-/opt/kafka/config/log4j2.properties}"
exec "$(dirname "$0")/kafka-run-class.sh" kafka.Kafka "$@"
