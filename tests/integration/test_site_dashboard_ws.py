"""The site dashboard's server with a raw WebSocket client, and the monitor's health samples.

The dashboard runs in the test's event loop against the session broker; samples are published
with the project's own KafkaBus, sealed as a monitor seals them (EV_CP_M/health.py). The
monitor tests run the real engine and monitor processes; forged samples must not show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import procs
from EV_CP_M.dashboard import MAX_CLIENT_BYTES, DashboardSettings, SiteDashboard
from EV_CP_M.health import HealthOpener, HealthSealer
from helpers import free_port, scaled, wait_for
from shared.bus import KafkaBus, Topics
from shared.lifecycle import Shutdown
from shared.messages import CPState, CPStateUpdate, HealthSample, encode

pytestmark = pytest.mark.kafka


def new_cp_id() -> str:
    return "CPS" + uuid.uuid4().hex[:8]


@pytest.fixture
async def bus(kafka_bootstrap: str) -> AsyncIterator[KafkaBus]:
    b = KafkaBus(kafka_bootstrap, "site-test")
    await b.start()
    yield b
    await b.stop()


# The CPs of the site the dashboard fixture watches, with their secrets (fresh ids each run:
# the session broker keeps other runs' samples).
SITE = {new_cp_id(): f"secret-{n}" for n in range(2)}
CP_A, CP_B = SITE
SEALERS = {cp_id: HealthSealer(cp_id, secret) for cp_id, secret in SITE.items()}


@contextlib.asynccontextmanager
async def site_dashboard(broker: str, secrets: dict[str, str]) -> AsyncIterator[SiteDashboard]:
    settings = DashboardSettings(
        broker=broker, http_port=0, listen_host="127.0.0.1", cp_secrets=secrets
    )
    shutdown = Shutdown()
    service = SiteDashboard(settings, shutdown)
    task = asyncio.create_task(service.run())
    await wait_for(lambda: service.port != 0 and service.ready or task.done(), 60)
    assert not task.done(), task
    try:
        yield service
    finally:
        shutdown.request()
        await asyncio.wait_for(task, scaled(15))


@pytest.fixture
async def dashboard(kafka_bootstrap: str, bus: KafkaBus) -> AsyncIterator[SiteDashboard]:
    async with site_dashboard(kafka_bootstrap, SITE) as service:
        yield service


def url(service: SiteDashboard, path: str) -> str:
    return f"http://127.0.0.1:{service.port}{path}"


def ws_url(service: SiteDashboard) -> str:
    return f"ws://127.0.0.1:{service.port}/ws"


def http(target: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(target, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def receive_until(
    ws: ClientConnection, wanted: Callable[[dict[str, Any]], bool], timeout: float = 5
) -> dict[str, Any]:
    """Read messages until one satisfies `wanted` (pushes of the site come in between)."""
    async with asyncio.timeout(scaled(timeout)):
        while True:
            message: dict[str, Any] = json.loads(await ws.recv())
            if wanted(message):
                return message


def cp_in(message: dict[str, Any], cp_id: str) -> dict[str, Any] | None:
    return next((cp for cp in message.get("cps", []) if cp["id"] == cp_id), None)


async def publish_samples(bus: KafkaBus, cp_id: str, **fields: Any) -> None:
    """A sample of a site CP, sealed as its monitor seals it."""
    value = encode(HealthSample(cp_id=cp_id, **fields))
    (sealed,) = SEALERS[cp_id].outgoing(Topics.CP_HEALTH, cp_id, value)
    await bus.send_raw(Topics.CP_HEALTH, cp_id.encode(), sealed)


# --- the WebSocket ----------------------------------------------------------------------------


async def test_snapshot_then_pushes_follow_the_samples(
    dashboard: SiteDashboard, bus: KafkaBus
) -> None:
    cp_id = CP_A
    await bus.send(
        Topics.CP_STATE,
        cp_id,
        CPStateUpdate(
            cp_id=cp_id,
            state=CPState.ACTIVADO,
            location="Test <b>site</b>",
            price_eur_kwh=0.4,
            max_kw=22,
        ),
    )
    await publish_samples(bus, cp_id, engine_ok=True, central_ok=True, rtt_ms=1.25)
    async with connect(ws_url(dashboard)) as ws:
        snapshot = json.loads(await ws.recv())
        assert snapshot["type"] == "snapshot"
        for key in ("now", "silence_s", "window_s", "summary", "cps", "timeline", "rtt"):
            assert key in snapshot, key
        assert snapshot["status"]["ready"] is True
        assert set(snapshot["states"]) == {s.value for s in CPState}

        site = await receive_until(ws, lambda m: (cp_in(m, cp_id) or {}).get("engine") == "OK")
        cp = cp_in(site, cp_id)
        assert cp is not None
        assert cp["state"] == "ACTIVADO" and cp["colour"] == "green"
        assert cp["location"] == "Test <b>site</b>"
        assert cp["rtt_ms"] == 1.25 and cp["central_ok"] is True and cp["monitor"] == "live"
        assert cp["availability"] == 1.0 and len(cp["strip"]) == 60

        # A KO sample: pushed within a second, with an open fault in the timeline.
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        await publish_samples(
            bus, cp_id, engine_ok=False, central_ok=True, detail="engine reports KO (IDLE)"
        )

        def has_fault(m: dict[str, Any]) -> bool:
            return any(f["cp_id"] == cp_id and f["open"] for f in m.get("timeline", []))

        site = await receive_until(ws, has_fault, timeout=3)
        assert loop.time() - sent_at < scaled(1.5)
        cp = cp_in(site, cp_id)
        assert cp is not None and cp["engine"] == "KO"
        assert cp["fault"]["detail"] == "engine reports KO (IDLE)"

        # Silence: the monitor counts as lost after 3 s without a sample.
        site = await receive_until(
            ws, lambda m: (cp_in(m, cp_id) or {}).get("monitor") == "lost", timeout=6
        )
        assert any(
            f["cp_id"] == cp_id and f["kind"] == "monitor" and f["open"] for f in site["timeline"]
        )


async def test_invalid_messages_get_an_error_and_the_server_stays_up(
    dashboard: SiteDashboard,
) -> None:
    async with connect(ws_url(dashboard)) as ws:
        assert json.loads(await ws.recv())["type"] == "snapshot"
        for bad in ("not json", '{"type":"nope"}', '{"type":"ping","extra":1}', "[]", b"\x00"):
            await ws.send(bad)
            error = await receive_until(ws, lambda m: m["type"] == "error")
            assert error["detail"], bad
        await ws.send(json.dumps({"type": "ping", "ref": "r1"}))
        pong = await receive_until(ws, lambda m: m["type"] == "pong")
        assert pong["ref"] == "r1"
        await ws.send(json.dumps({"type": "snapshot"}))
        await receive_until(ws, lambda m: m["type"] == "snapshot")

    # Oversized: only that connection is closed (1009, message too big).
    async with connect(ws_url(dashboard), max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "ping", "ref": "x" * MAX_CLIENT_BYTES}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    # A client that keeps sending nonsense is closed too (policy violation).
    async with connect(ws_url(dashboard)) as ws:
        await ws.recv()
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(100):
                await ws.send("nonsense")
                await asyncio.sleep(0.01)
            while True:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008

    async with connect(ws_url(dashboard)) as ws:
        assert json.loads(await ws.recv())["type"] == "snapshot"
    status, _, body = await asyncio.to_thread(http, url(dashboard, "/healthz"))
    assert status == 200, body
    assert json.loads(body)["status"] == "ok"


async def test_http_pages_carry_a_strict_csp(dashboard: SiteDashboard) -> None:
    status, headers, body = await asyncio.to_thread(http, url(dashboard, "/"))
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    page = body.decode()
    assert 'id="reconnecting"' in page and 'id="connection"' in page and 'id="timeline"' in page
    assert "<script>" not in page and "style=" not in page and "<style" not in page

    for name in ("site.js", "site.css", "ev.js", "ev.css", "favicon.svg"):
        status, headers, _ = await asyncio.to_thread(http, url(dashboard, f"/static/{name}"))
        assert status == 200, name
        assert "Content-Security-Policy" in headers
    for bad in ("/static/../dashboard.py", "/static/.hidden.js", "/static/site.py", "/nope"):
        status, _, _ = await asyncio.to_thread(http, url(dashboard, bad))
        assert status == 404, bad

    status, headers, body = await asyncio.to_thread(http, url(dashboard, "/api/site"))
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    site = json.loads(body)
    assert isinstance(site["cps"], list) and isinstance(site["timeline"], list)
    assert site["status"]["consuming"] is True


# --- the monitor's samples --------------------------------------------------------------------


async def start_engine(tmp_path: Path, broker: str) -> tuple[procs.ServiceProcess, int]:
    port = free_port()
    engine = procs.ServiceProcess(
        "engine", ["-m", "EV_CP_E", "--broker", broker, "--listen", f"127.0.0.1:{port}"], tmp_path
    ).start()
    await engine.wait_output("IDLE", timeout=15)
    return engine, port


MONITOR_SECRET = "unused-without-central"  # seals the health samples all the same


def start_monitor(
    tmp_path: Path, cp_id: str, engine_port: int, broker: str
) -> procs.ServiceProcess:
    return procs.ServiceProcess(
        f"monitor-{cp_id}",
        [
            "-m",
            "EV_CP_M",
            "--engine",
            f"127.0.0.1:{engine_port}",
            "--central",
            f"127.0.0.1:{free_port()}",  # no Central: the link stays down
            "--cp-id",
            cp_id,
            "--interval",
            "0.5",
            "--broker",
            broker,
            "--secret",
            MONITOR_SECRET,
        ],
        tmp_path,
    ).start()


async def test_the_monitor_publishes_a_sealed_sample_after_every_check(
    tmp_path: Path, kafka_bootstrap: str, bus: KafkaBus
) -> None:
    cp_id = new_cp_id()
    consumer = await bus.tail_consumer([Topics.CP_HEALTH])
    samples: list[HealthSample] = []
    opener = HealthOpener({cp_id: MONITOR_SECRET})

    async def collect() -> None:
        async for record in consumer:
            if record.key == cp_id.encode():
                samples.append(opener.open(record.value or b""))

    engine, port = await start_engine(tmp_path, kafka_bootstrap)
    monitor = start_monitor(tmp_path, cp_id, port, kafka_bootstrap)
    collector = asyncio.create_task(collect())
    try:
        await wait_for(lambda: len(samples) >= 4, 20, message=monitor.output)
        ok = samples[-1]
        assert ok.engine_ok is True and ok.central_ok is False
        assert ok.rtt_ms is not None and ok.rtt_ms >= 0
        assert ok.interval_s == 0.5 and ok.cp_state is None
        seqs = [s.seq for s in samples]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        gaps = [b.ts - a.ts for a, b in zip(samples[-4:-1], samples[-3:], strict=True)]
        assert all(0.2 < gap < 1.0 for gap in gaps), gaps

        mark = len(samples)
        engine.send("k")
        await wait_for(lambda: any(not s.engine_ok for s in samples[mark:]), 3)
        ko = next(s for s in samples[mark:] if not s.engine_ok)
        assert ko.detail.startswith("engine reports KO") and ko.rtt_ms is None

        # The engine dies: samples go on (engine unreachable), the monitor is not silent.
        engine.kill()
        mark = len(samples)
        await wait_for(lambda: len(samples) >= mark + 8, 10, message=monitor.output)
        assert not samples[-1].engine_ok
        assert "engine" in samples[-1].detail
        gaps = [b.ts - a.ts for a, b in zip(samples[mark:-1], samples[mark + 1 :], strict=True)]
        assert max(gaps) < 2.0, gaps
    finally:
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        monitor.stop()
        engine.stop()


async def test_the_monitor_checks_on_when_its_broker_is_down(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    engine, port = await start_engine(tmp_path, kafka_bootstrap)
    monitor = start_monitor(tmp_path, new_cp_id(), port, f"127.0.0.1:{free_port()}")
    try:
        await monitor.wait_output(r"engine OK \(round trip", timeout=15)
        mark = len(monitor.output)
        engine.send("k")
        await monitor.wait_output("engine KO", timeout=3, start=mark)
        mark = len(monitor.output)
        engine.send("o")
        await monitor.wait_output("engine OK", timeout=3, start=mark)
        assert monitor.running
        assert monitor.stop() == 0  # a broker that is down does not hold the exit
        assert "Traceback" not in monitor.output
    finally:
        monitor.stop()
        engine.stop()


async def test_a_forged_or_replayed_sample_does_not_reach_the_site_dashboard(
    tmp_path: Path, kafka_bootstrap: str, bus: KafkaBus
) -> None:
    cp_id = new_cp_id()
    copies = await bus.tail_consumer([Topics.CP_HEALTH])
    engine, port = await start_engine(tmp_path, kafka_bootstrap)
    monitor = start_monitor(tmp_path, cp_id, port, kafka_bootstrap)
    try:
        async with (
            site_dashboard(kafka_bootstrap, {cp_id: MONITOR_SECRET}) as dashboard,
            connect(ws_url(dashboard)) as ws,
        ):
            # The real monitor's samples show: its engine is OK.
            await receive_until(ws, lambda m: (cp_in(m, cp_id) or {}).get("engine") == "OK", 20)
            real = None
            async with asyncio.timeout(scaled(10)):
                while real is None:
                    record = await copies.getone()
                    real = record.value if record.key == cp_id.encode() else None
            refused = dashboard.refused_samples

            # Anyone on Kafka says the engine is KO: in clear, sealed with a made-up secret,
            # or with the real monitor's key for another CP; and a real sample comes again.
            forged = HealthSample(
                cp_id=cp_id, engine_ok=False, central_ok=True, detail="forged", seq=10**6
            )
            clear = encode(forged)
            (wrong_key,) = HealthSealer(cp_id, "a guess").outgoing("", "", clear)
            other = encode(forged.model_copy(update={"cp_id": "CP001"}))
            (moved,) = HealthSealer(cp_id, MONITOR_SECRET).outgoing("", "", other)
            for value in (clear, wrong_key, moved, real):
                await bus.send_raw(Topics.CP_HEALTH, cp_id.encode(), value)
            await wait_for(lambda: dashboard.refused_samples >= refused + 4, 10)
            # None of them reached the page: the engine stays OK, no fault opens.
            with contextlib.suppress(TimeoutError):
                await receive_until(
                    ws,
                    lambda m: (
                        (cp_in(m, cp_id) or {}).get("engine") != "OK"
                        or any(f["cp_id"] == cp_id for f in m.get("timeline", []))
                    ),
                    timeout=2,
                )
                pytest.fail("a forged health sample reached the site dashboard")
            assert dashboard.status()["refused_samples"] >= refused + 4
    finally:
        monitor.stop()
        engine.stop()
