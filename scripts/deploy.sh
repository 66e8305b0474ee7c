#!/usr/bin/env bash
# Bring one PC's part of the EV charging network up or down with Docker Compose.
#
#   scripts/deploy.sh PC ACTION [SERVICE] [--build] [--follow]
#
#   PC       pc1 (Kafka node 1, the standby Central, driver dashboard), pc2 (Kafka node 2,
#            Kafka UI, the active Central), pc3 (Kafka node 3, charging points, site
#            dashboard), all (everything on this one host: one broker, one Central)
#   ACTION   up       write .env from network_config.py, build, start, wait until healthy
#            down     stop and remove the containers (volumes and the database are kept)
#            status   the containers and their health
#            logs     follow the logs (of SERVICE, or all)
#            attach   attach to SERVICE's terminal, e.g. an engine's menu (Ctrl-P Ctrl-Q detaches)
#            config   print the compose file with .env applied (what `up` would run)
#            keys     what `up` does first: make (pc2, all) or check (pc1, pc3) the
#                     certificates and secrets, without starting anything
#   --build  with up: build the images first, on a freshly pulled base image
#            (docker compose build --pull), then start
#   --follow with up: once healthy, follow the logs (of SERVICE, or all) until Ctrl-C; the
#            containers keep running. logs always follows, with or without it
#   --help   this text
#
# Addresses and ports come from network_config.py, overridden by environment variables
# (PC2_IP=192.168.1.20 scripts/deploy.sh pc3 up). Secure by default: `pc2 up` (or `all up`)
# makes the local CA, the certificates, the Kafka passwords and the audit key the two Centrals
# share when they are missing (certs/, secrets/), and names the files to copy to PC1 and PC3
# before their `up` (docs/security.md, "The deployment"; SECURE=0 turns TLS and Kafka's logins
# off). Environment: PYTHON (python3), EV_DEPLOY_WAIT (seconds `up` waits for
# health, default 180), EV_COMPOSE (the compose command, e.g. "scripts/podman-setup.sh compose";
# default `docker compose`, else docker-compose) and DOCKER (docker; podman for Podman).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "deploy: $*" >&2; exit 1; }
help_text() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
usage() { [[ $# -eq 0 ]] || echo "deploy: $*" >&2; help_text >&2; exit 2; }

BUILD=0; FOLLOW=0; POSITIONAL=()
for arg in "$@"; do
    case "$arg" in
        --build) BUILD=1 ;;
        --follow) FOLLOW=1 ;;
        -h|--help) help_text; exit 0 ;;
        -*) usage "unknown option $arg" ;;
        *) POSITIONAL+=("$arg") ;;
    esac
done
(( ${#POSITIONAL[@]} <= 3 )) || usage "too many arguments: ${POSITIONAL[*]}"
PC="${POSITIONAL[0]:-}"; ACTION="${POSITIONAL[1]:-}"; SERVICE="${POSITIONAL[2]:-}"
case "$PC" in pc1|pc2|pc3) FILE="docker-compose.$PC.yml" ;; all) FILE=docker-compose.yml ;; *) usage ;; esac
case "$ACTION" in up|down|status|logs|attach|config|keys) ;; *) usage ;; esac
(( BUILD == 0 )) || [[ "$ACTION" == up ]] || usage "--build goes with up"
(( FOLLOW == 0 )) || [[ "$ACTION" == up || "$ACTION" == logs ]] || usage "--follow goes with up (logs always follows)"
PROJECT="ev-$PC"
PYTHON="${PYTHON:-python3}"

DOCKER="${DOCKER:-docker}"
if [[ -n "${EV_COMPOSE:-}" ]]; then
    # e.g. Podman (docs/deployment.md, "Tested with Podman"): EV_COMPOSE="scripts/podman-setup.sh
    # compose" DOCKER=podman
    read -r -a COMPOSE <<<"$EV_COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    die "neither 'docker compose' nor 'docker-compose' found: install Docker (Desktop) with Compose"
fi
compose() { "${COMPOSE[@]}" --project-name "$PROJECT" --env-file .env -f "$FILE" "$@"; }

write_env() {
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found: Python 3.11 writes .env (set PYTHON=...)"
    # Three PCs: every PC's Kafka node is dialled at its PCn_IP, so none may be loopback.
    local three=""; [[ "$PC" == all ]] || three=--three-pcs
    "$PYTHON" network_config.py --env .env ${three:+"$three"} >/dev/null \
        || die "network_config.py refused the settings (above)"
    echo "deploy: .env written ($(tr '\n' ' ' < .env | cut -c1-120)...)"
}

# Secure by default (docs/security.md, "The deployment"): on the first `up`, PC2 (or `all`)
# makes what is missing of the local CA and the certificates (certs/), the Kafka logins'
# passwords and the audit key both Centrals share (secrets/), and says which files to copy to
# PC1 and PC3; their `up` checks that they have them. SECURE=0 (network_config.py) turns TLS
# and Kafka's logins off: then only the audit key is made (PC2) and copied (PC1).
setting() { sed -n "s/^$1=//p" .env; }
make_keys() {
    local made=() missing=() file
    if [[ "$PC" == pc2 || "$PC" == all ]]; then
        if [[ "$(setting SECURE)" == 1 ]]; then
            [[ -f certs/ca.crt ]] || made+=("the local CA (certs/ca.crt; its key certs/ca.key stays on this PC)")
            "$PYTHON" scripts/make-certs.py --out certs >/dev/null || die "scripts/make-certs.py" \
                "failed (above): it needs Python's cryptography package (pip install cryptography," \
                "or PYTHON=.venv/bin/python); with new addresses, add --force to issue new certificates"
            local said; said="$("$PYTHON" network_config.py --kafka-passwords secrets)"
            [[ "$said" == created* ]] && made+=("Kafka passwords: ${said#created }")
        fi
        if [[ "$PC" == pc2 && "$("$PYTHON" network_config.py --audit-key secrets/central.audit-key)" == created* ]]; then
            made+=("the audit key both Centrals share")
        fi
    fi
    if [[ "$PC" == pc2 ]]; then
        if (( ${#made[@]} )); then
            printf 'deploy: made %s\n' "${made[@]}" >&2
            echo "deploy: keep certs/ and secrets/ private (the CA's key never leaves this PC)" >&2
            for other in pc1 pc3; do
                echo "deploy: copy to ${other^^} (the same paths in its copy of this repository)" \
                    "before scripts/deploy.sh $other up:" $("$PYTHON" network_config.py --needs "$other") >&2
            done
        fi
    elif [[ "$PC" != all ]]; then
        for file in $("$PYTHON" network_config.py --needs "$PC"); do
            [[ -s "$file" ]] || missing+=("$file")
        done
        (( ${#missing[@]} == 0 )) || die "missing ${missing[*]}: copy them from PC2" \
            "(scripts/deploy.sh pc2 up makes them there; docs/security.md, \"The deployment\")"
    fi
    # Kafka UI (PC2) takes its password only in its configuration (docker-compose.pc2.yml).
    if [[ -f secrets/kafka-kafka-ui.password ]]; then
        KAFKA_UI_PASSWORD="$(head -n 1 secrets/kafka-kafka-ui.password)"
        export KAFKA_UI_PASSWORD
    fi
    mkdir -p certs secrets  # the keys service mounts both, also when empty (SECURE=0)
}

# The names of this project's services that are not (yet) healthy; one-shot services that
# exited 0 count as done.
unhealthy() {
    local id state
    for id in $(compose ps -q); do
        state="$("$DOCKER" inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}} {{.State.ExitCode}}' "$id" 2>/dev/null)" \
            || continue  # removed since it was listed
        read -r name status health code <<<"$state"
        if [[ "$status" == exited && "$code" == 0 ]]; then continue; fi
        if [[ "$status" != running || ( "$health" != healthy && "$health" != - ) ]]; then
            echo "${name#/}($status/$health)"
        fi
    done
}

# down, status, logs and attach read the .env the last `up` wrote; without one, a fresh one.
if [[ "$ACTION" != up && "$ACTION" != config && "$ACTION" != keys && ! -f .env ]]; then
    "$PYTHON" network_config.py --env .env >/dev/null || die "network_config.py refused the settings"
fi

case "$ACTION" in
up)
    write_env
    make_keys
    "$DOCKER" info >/dev/null 2>&1 || die "the Docker engine does not answer: start Docker (Desktop) first"
    if (( BUILD )); then compose build --pull; fi
    compose up -d --build --remove-orphans
    deadline=$(( $(date +%s) + ${EV_DEPLOY_WAIT:-180} ))
    while pending="$(unhealthy)"; [[ -n "$pending" ]]; do
        if (( $(date +%s) >= deadline )); then
            compose ps
            die "not healthy after ${EV_DEPLOY_WAIT:-180}s: $pending (scripts/deploy.sh $PC logs SERVICE)"
        fi
        sleep 3
    done
    compose ps
    echo "deploy: $PC is up and healthy. Check it from every PC: python scripts/preflight.py --pc $PC"
    if (( FOLLOW )); then
        echo "deploy: following the logs; Ctrl-C stops following, the containers keep running" >&2
        compose logs -f --tail 200 ${SERVICE:+"$SERVICE"}
    fi
    ;;
down)   compose down --remove-orphans ;;
status) compose ps; pending="$(unhealthy)"; [[ -z "$pending" ]] || { echo "not healthy: $pending"; exit 1; } ;;
logs)   compose logs -f --tail 200 ${SERVICE:+"$SERVICE"} ;;
attach)
    [[ -n "$SERVICE" ]] || die "attach which service? e.g. scripts/deploy.sh $PC attach engine-cp1"
    id="$(compose ps -q "$SERVICE")"
    [[ -n "$id" ]] || die "$SERVICE is not running in $PROJECT (scripts/deploy.sh $PC status)"
    echo "deploy: attached to $SERVICE; detach with Ctrl-P Ctrl-Q (Ctrl-C would stop it)" >&2
    "$DOCKER" attach "$id"
    ;;
config) write_env >&2; compose config ;;
keys)   write_env >&2; make_keys ;;
esac
