#!/usr/bin/env bash
# shellcheck disable=SC2317  # the have_* checks are called by name, from PIECES
# What `make test` and `make run` need from the machine, in one place (the Makefile and
# .ci/run both call this script).
#
#   scripts/prereqs.sh test|run [--check]
#
# Every missing piece is named with the Debian package that provides it. As root, on a machine
# with apt-get, the missing packages are installed; otherwise (and always with --check) one
# line names every missing piece and the command that installs them all, and the exit code is
# 1: the caller stops before it has created or started anything.
#
# Environment: PYTHON, the interpreter the Makefile builds .venv with (default python3).
#
# Besides the tools it checks, the script runs nothing but shell builtins, so it gives the same
# answer on any PATH (the tests run it on a PATH that lacks some of the tools).
set -euo pipefail

PYTHON="${PYTHON:-python3}"

# One line per piece: what the message calls it | its Debian package | the check | the goals.
PIECES=(
    "python3 >= 3.11 with venv|python3-venv|have_python|test run"
    "java >= 17|openjdk-17-jre-headless|have_java|test run"
    "mvn (fetches Kafka's jars)|maven|have mvn|test run"
    "make|make|have make|test"
    "chromium (browser tests)|chromium|have chromium|test"
    "docker-compose (compose file checks)|docker-compose|have_compose|test"
    "ip (multi-host tests)|iproute2|have ip|test"
    "faketime (clock skew tests)|faketime|have faketime|test"
    "iptables (chaos network faults)|iptables|have iptables|test"
    "podman (compose run)|podman|have podman|test"
    "buildah (compose run)|buildah|have buildah|test"
    "debootstrap (compose run)|debootstrap|have debootstrap|test"
    "runc (compose run)|runc|have runc|test"
)

usage() {
    echo "usage: scripts/prereqs.sh test|run [--check]" >&2
    exit 2
}

have() { command -v "$1" >/dev/null; }

# Debian's python3 lacks ensurepip (so `python3 -m venv` fails) until python3-venv is installed.
have_python() {
    "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' \
        >/dev/null 2>&1
}

# `java -version` says `version "17.0.15"`, or `version "1.8.0_402"` for Java 8 and older.
have_java() {
    local out major
    out="$(java -version 2>&1)" || return 1
    [[ $out =~ version\ \"([0-9]+)(\.([0-9]+))? ]] || return 1
    major="${BASH_REMATCH[1]}"
    [[ $major == 1 ]] && major="${BASH_REMATCH[3]:-0}"
    ((major >= 17))
}

# Either Compose validates the files: Debian's docker-compose or Docker's compose plugin.
have_compose() {
    have docker-compose || docker compose version >/dev/null 2>&1
}

# Fills MISSING (names) and PACKAGES (Debian packages) with what GOAL lacks.
find_missing() {
    MISSING=()
    PACKAGES=()
    local piece name package check goals
    for piece in "${PIECES[@]}"; do
        IFS='|' read -r name package check goals <<<"$piece"
        [[ " $goals " == *" $GOAL "* ]] || continue
        $check || { MISSING+=("$name"); PACKAGES+=("$package"); }
    done
}

# The one line: every missing piece and the command that installs them all.
report() {
    local names="" name sudo=""
    for name in "${MISSING[@]}"; do
        names+="${names:+, }$name"
    done
    ((EUID == 0)) || sudo="sudo "
    echo "make $GOAL: missing $names; install them with: ${sudo}apt-get install -y ${PACKAGES[*]}" >&2
}

apt_install() {
    echo "make $GOAL: installing ${PACKAGES[*]} with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}"
}

GOAL="${1:-}"
[[ $GOAL == test || $GOAL == run ]] || usage
CHECK_ONLY=0
case "${2:-}" in
"") ;;
--check) CHECK_ONLY=1 ;;
*) usage ;;
esac

find_missing
((${#MISSING[@]})) || exit 0
if ((!CHECK_ONLY && EUID == 0)) && have apt-get; then
    # A failed install (no network, say) is not the end: the check below names what is missing.
    apt_install || true
    find_missing # what the packages did not bring (a Python older than 3.11, say)
    ((${#MISSING[@]})) || exit 0
fi
report
exit 1
