"""python -m tools.chaos: a charging network under random faults, and an auditor's verdict.

Starts Kafka, Central, a few real CPs (engine and monitor) and driver apps and the fleet
simulator as real processes, keeps supplies going, injects faults at random times from a seeded
schedule (the same seed gives the same schedule), lets everything settle and checks, from the
engines' and drivers' own records, that nothing was lost, counted twice or billed wrong. Writes
results.json, timeline.png and report.html to --out; exit code 1 when an invariant is violated
(docs/reliability.md).

With --net (root) the network runs on three simulated PCs (scripts/netns.sh): the tool makes
them, runs itself again inside PC2 beside Kafka and Central (the drivers go on PC1, the real CPs
on PC3), and removes them when that run ends, however it ends; the faults then also cut a PC off
the network and lose or delay its packets.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import NoReturn

from tools.chaos.schedule import KINDS, ScheduleError, make_schedule, parse_kinds
from tools.chaos.system import KAFKA_SH, Hosts, Settings
from tools.chaos.system import SystemError_ as ChaosSystemError

PROG = "python -m tools.chaos"


class Parser(argparse.ArgumentParser):
    """Errors in one line, naming the program (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def seed_value(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the seed must be a whole number, got {text!r}") from None


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=positive, default=120.0, help="seconds of faults (120)")
    p.add_argument("--seed", type=seed_value, help="the schedule's seed (default: a random one)")
    p.add_argument(
        "--faults",
        default="all",
        help="comma-separated fault kinds, or all: " + ", ".join(KINDS),
    )
    p.add_argument("--rate", type=positive, default=15.0, help="faults a minute, on average")
    p.add_argument("--ha", action="store_true", help="a three-node Kafka cluster and two Centrals")
    p.add_argument("--cps", type=int, default=4, help="real CPs (engine and monitor each)")
    p.add_argument("--drivers", type=int, default=4, help="real driver apps (user1..)")
    p.add_argument("--fleet-cps", type=int, default=200, help="simulated CPs (0: none)")
    p.add_argument(
        "--net",
        action="store_true",
        help="run on three simulated PCs (network namespaces: root, ip and iptables) and add "
        "the network faults net-cut, net-loss and net-delay",
    )
    # Set by the tool itself when it runs again inside PC2: PREFIX,SUBNET of the PCs it made.
    p.add_argument("--on-hosts", type=Hosts.parse, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path("chaos-out"), help="where results go")
    p.add_argument(
        "--schedule-only", action="store_true", help="print the schedule as JSON lines and stop"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    if not 1 <= args.cps <= 10 or not 1 <= args.drivers <= 5 or not 0 <= args.fleet_cps <= 2000:
        fail("--cps must be 1..10, --drivers 1..5 (the demo drivers), --fleet-cps 0..2000")
    hosts: Hosts | None = args.on_hosts
    if args.net and hosts is None:
        hosts = Hosts.for_this_run()
    settings = Settings(
        out=args.out,
        real_cps=args.cps,
        drivers=args.drivers,
        fleet_cps=args.fleet_cps,
        ha=args.ha,
        hosts=hosts,
    )
    from tools.chaos.run import Run, execute, targets

    try:
        kinds = parse_kinds(args.faults, net=hosts is not None)
        cp_ids = [f"CP{i:03d}" for i in range(1, args.cps + 1)]
        driver_ids = [f"user{i}" for i in range(1, args.drivers + 1)]
        schedule = make_schedule(
            seed, args.duration, kinds, targets(settings, cp_ids, driver_ids), rate=args.rate
        )
    except ScheduleError as exc:
        fail(str(exc))
    if args.schedule_only:
        import json

        for fault in schedule:
            print(json.dumps(fault.as_json()))
        return 0
    if hosts is not None and args.on_hosts is None:
        missing = _cannot_make_hosts()
        if missing:
            fail(f"--net needs {missing}")
    jars = subprocess.run([str(KAFKA_SH), "jars"], capture_output=True, text=True, check=False)
    if jars.returncode != 0:
        last = (jars.stderr.strip().splitlines() or ["kafka.sh jars failed"])[-1]
        fail(f"cannot get Kafka's jars ({last}); run `scripts/kafka.sh jars` with Maven Central")
    command = f"{PROG} --seed {seed} --duration {args.duration:g} --faults {','.join(kinds)}"
    command += f" --rate {args.rate:g} --cps {args.cps} --drivers {args.drivers}"
    command += f" --fleet-cps {args.fleet_cps}" + (" --ha" if args.ha else "")
    command += " --net" if hosts is not None else ""
    command += f" --out {shlex.quote(str(args.out))}"
    if hosts is not None and args.on_hosts is None:
        return on_hosts(hosts, [*argv, "--seed", str(seed), "--on-hosts", hosts.as_arg()])
    logging.basicConfig(level=logging.INFO, format="chaos: %(message)s", stream=sys.stderr)
    run = Run(seed, args.duration, kinds, schedule, settings, command)
    try:
        results = execute(run)
    except ChaosSystemError as exc:
        fail(f"the network did not start: {exc}")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM to the tool outside the simulated PCs
        print(f"{PROG}: interrupted: every part stopped, no report", file=sys.stderr)
        return 130
    from tools.chaos.report import write_report

    paths = write_report(results, args.out)
    totals = results["totals"]
    verdict = "PASS" if totals["violations"] == 0 else "FAIL"
    print(
        f"{verdict}: seed {seed}, {totals['faults']} faults, {totals['supplies']} supplies "
        f"({totals['kwh']:.3f} kWh, {totals['euros']:.2f} €), {totals['violations']} violations;"
        f" report: {paths['html']}"
    )
    for invariant in results["invariants"]:
        for text in invariant["violations"][:5]:
            print(f"  {invariant['name']}: {text}")
    return 0 if totals["violations"] == 0 else 1


def _cannot_make_hosts() -> str:
    """What this machine lacks for the simulated PCs, in words ("" when nothing)."""
    if os.geteuid() != 0:
        return "root (network namespaces)"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"{tool}, which is not installed (apt-get install {package})"
    return ""


def on_hosts(hosts: Hosts, argv: list[str]) -> int:
    """Make the simulated PCs, run the tool again inside PC2 with `argv`, and remove the PCs
    (and whatever still runs in them) when it ends, also on Ctrl-C or SIGTERM."""
    print(f"chaos: simulated PCs {hosts.prefix}-pc1..3 on {hosts.subnet}.0/24", file=sys.stderr)
    try:
        hosts.netns_sh("clean-stale")  # the PCs of a run that was killed
        hosts.up()
    except ChaosSystemError as exc:
        fail(f"cannot make the simulated PCs: {exc}")
    try:
        inner = subprocess.Popen(
            ["ip", "netns", "exec", hosts.ns("pc2"), sys.executable, "-m", "tools.chaos", *argv]
        )

        def stop(signum: int, frame: FrameType | None) -> None:
            inner.send_signal(signal.SIGINT)  # the run stops its processes, then reports

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            while True:
                try:
                    code = inner.wait()
                    break
                except KeyboardInterrupt:
                    # Ctrl-C reached the run too (one process group): wait while it stops; a
                    # second one ends it.
                    continue
        finally:
            signal.signal(signal.SIGTERM, previous)
        return code if code >= 0 else 128 - code
    finally:
        try:
            hosts.down()
        except ChaosSystemError as exc:
            print(f"{PROG}: the simulated PCs were not all removed: {exc}", file=sys.stderr)


def fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    sys.exit(main())
