// Central's admin panel. Everything arrives over the /ws WebSocket (a snapshot, then pushes)
// and every value is inserted as text through EV.el / textContent, never as HTML.
"use strict";

(() => {
  const { el, replace } = EV;

  const STATES = ["ACTIVADO", "SUMINISTRANDO", "PARADO", "AVERIADO", "DESCONECTADO"];
  const STATE_MEANING = {
    ACTIVADO: "ready",
    SUMINISTRANDO: "supplying",
    PARADO: "out of service",
    AVERIADO: "engine fault",
    DESCONECTADO: "no monitor",
  };
  // What a tile adds after the driver's id while the session is not supplying.
  const PHASE_NOTE = {
    ASKED: " (reserved: waiting for the CP to accept)",
    AUTHORISED: " (reserved: waiting for the plug)",
    ENDING: " (ending)",
  };
  const TILE_NOTE = {
    ACTIVADO: "Ready for a supply",
    PARADO: "Out of service (stopped by Central)",
    AVERIADO: "Engine KO or unreachable",
    DESCONECTADO: "No heartbeat from its monitor",
  };
  const FINISHED = new Set(["COMPLETED", "ABORTED", "DENIED", "EXPIRED"]);
  const EVENT_KIND = {
    registered: "info", connected: "good", authorised: "good", started: "good",
    ticket: "good", recovered: "good", resumed: "good", login: "info", start: "info",
    denied: "bad", fault: "bad", disconnected: "bad", stopped: "warn", ending: "warn",
    corrected: "warn", clock: "warn", weather: "warn",
  };
  const MAX_EVENTS = 200;
  const CHART_SPAN = 120; // seconds
  const TOTAL_COLOUR = "#20242b";
  const PALETTE = ["#2458d6", "#e8590c", "#0ca678", "#ae3ec9", "#f59f00", "#1098ad",
    "#d6336c", "#5c940d", "#7048e8", "#c92a2a"];

  const cps = new Map(); // id -> latest CP object from the server
  const tiles = new Map(); // id -> {root, parts...}
  let sessions = [];
  let drivers = [];
  const pending = new Map(); // ref -> {kind, timer}
  let refSeq = 0;
  let socket = null;

  const $ = (id) => document.getElementById(id);
  const num = (v) => Number(v) || 0;
  const price = (v) => num(v).toFixed(2) + " €/kWh";

  // --- charging point tiles ----------------------------------------------------------------

  function buildTile(id) {
    const t = {};
    t.id = el("span", { class: "id" }, id);
    t.state = el("span", { class: "state" });
    t.loc = el("div", { class: "loc" });
    t.meta = el("div", { class: "meta" });
    t.speed = el("span", { class: "sim-time", dataset: { field: "speed" }, hidden: true,
      title: "This CP's engine runs a simulated clock: its energy and cost grow that much faster" });
    t.note = el("div", { class: "note" });
    t.weather = el("div", { class: "weather-line", dataset: { field: "weather" } });
    t.driver = el("span", { dataset: { field: "driver" } });
    t.kw = el("b", { dataset: { field: "kw" } });
    t.kwh = el("b", { dataset: { field: "kwh" } });
    t.eur = el("b", { dataset: { field: "eur" } });
    t.live = el("div", { class: "live", hidden: true },
      el("div", { class: "driver" }, "Driver ", t.driver),
      el("div", { class: "fig energy" }, t.kwh, el("small", {}, "energy")),
      el("div", { class: "fig" }, t.kw, el("small", {}, "power")),
      el("div", { class: "fig" }, t.eur, el("small", {}, "cost")));
    t.stop = el("button", { type: "button", dataset: { action: "stop", target: id } }, "Stop");
    t.resume = el("button", { type: "button", dataset: { action: "resume", target: id } }, "Resume");
    t.revoke = el("button", { type: "button", dataset: { action: "revoke_key", target: id },
      title: "Revoke its keys: the monitor must authenticate again with its secret" }, "Revoke key");
    t.reset = el("button", { type: "button", dataset: { action: "reset_secret", target: id },
      title: "Issue a new secret (shown once); the old one stops working" }, "Reset secret");
    t.root = el("article", { class: "tile", dataset: { cp: id } },
      el("div", { class: "tile-head" }, t.id, t.state), t.loc, t.meta, t.weather, t.speed, t.note, t.live,
      el("div", { class: "actions" }, t.stop, t.resume),
      el("div", { class: "actions keys" }, t.revoke, t.reset));
    return t;
  }

  function renderTile(cp) {
    let t = tiles.get(cp.id);
    if (!t) {
      t = buildTile(cp.id);
      tiles.set(cp.id, t);
      const grid = $("cps");
      const after = [...tiles.keys()].sort().find((other) => other > cp.id);
      grid.insertBefore(t.root, after ? tiles.get(after).root : null);
    }
    const state = STATES.includes(cp.state) ? cp.state : "DESCONECTADO";
    t.root.className = `tile state-${state}`;
    t.root.dataset.state = state;
    t.root.setAttribute("aria-label", `${cp.id} ${state}`);
    t.state.textContent = state;
    t.loc.textContent = cp.location;
    t.meta.textContent = `${price(cp.price_eur_kwh)} · ${num(cp.max_kw)} kW max`;
    const simulated = EV.simulated(cp.speed);
    t.speed.textContent = simulated || "";
    t.speed.hidden = !simulated;
    const busy = Boolean(cp.driver_id);
    t.live.hidden = !busy;
    if (busy) {
      t.driver.textContent = cp.driver_id + (PHASE_NOTE[cp.session_phase] || "");
      t.kw.textContent = EV.kw(cp.kw);
      t.kwh.textContent = EV.kwh(cp.kwh);
      t.eur.textContent = EV.euro(cp.amount_eur);
    }
    const why = state === "PARADO" && cp.stop_reason ? `Out of service: ${cp.stop_reason}` : "";
    t.note.textContent = busy ? "" : why || TILE_NOTE[state] || "";
    t.note.hidden = busy;
    showWeather(t, cp.id);
    t.stop.disabled = cp.in_service === false;
    t.resume.disabled = cp.in_service !== false;
  }

  // --- weather (EV_W) ------------------------------------------------------------------------

  let weather = []; // every watched place, as Central last pushed it
  let weatherByCp = new Map(); // CP id -> its place's entry of `weather`

  const celsius = (v) => (v === null || v === undefined ? "–" : `${num(v).toFixed(1)} °C`);

  function setWeather(places) {
    weather = places;
    weatherByCp = new Map(weather.flatMap((w) => (w.cps || []).map((id) => [id, w])));
    renderWeather();
  }

  function showWeather(t, cpId) {
    const line = weatherLine(weatherByCp.get(cpId));
    t.weather.textContent = line;
    t.weather.hidden = !line;
  }

  function weatherLine(w) {
    if (!w) return "";
    const why = w.error ? `: ${w.error}` : "";
    if (w.temperature === null || w.temperature === undefined) return `${w.place}: no weather yet${why}`;
    return `${w.place} ${celsius(w.temperature)}${w.stale ? ` (stale${why})` : ""}`;
  }

  function renderWeather() {
    const rows = weather.map((w) => el("tr", { dataset: { place: w.place }, class: w.frozen ? "frozen" : w.stale ? "stale" : "" },
      el("td", {}, w.place),
      el("td", { class: "num", dataset: { field: "temperature" } }, celsius(w.temperature)),
      el("td", {}, w.provider || "–"),
      el("td", { dataset: { field: "updated" } }, (w.updated_at ? EV.time(w.updated_at) : "never") +
        (w.stale ? ` (stale${w.error ? ": " + w.error : ""})` : "")),
      el("td", {}, (w.cps || []).join(", "))));
    replace($("weather"), rows);
    $("weather-empty").hidden = weather.some((w) => w.updated_at || w.error);
    replace($("weather-alerts"), weather.filter((w) => w.frozen).map((w) =>
      el("li", { class: "weather-alert", dataset: { place: w.place } },
        `Frost at ${w.place}: ${celsius(w.temperature)} since ${EV.time(w.frozen_at)}; `,
        `${(w.cps || []).join(", ")} out of service`)));
    for (const [id, t] of tiles) showWeather(t, id);
  }

  function renderLegend() {
    const counts = Object.fromEntries(STATES.map((s) => [s, 0]));
    for (const cp of cps.values()) if (cp.state in counts) counts[cp.state] += 1;
    replace($("legend"), STATES.map((s) => el("li", { class: `state-${s}`, dataset: { state: s } },
      s, el("span", { class: "what" }, STATE_MEANING[s]), el("span", { class: "n" }, counts[s]))));
    $("cp-count").textContent = `(${cps.size})`;
  }

  function applyCps(list, full) {
    if (full) {
      const keep = new Set(list.map((cp) => cp.id));
      for (const [id, t] of tiles) {
        if (!keep.has(id)) { t.root.remove(); tiles.delete(id); cps.delete(id); }
      }
    }
    for (const cp of list) {
      cps.set(cp.id, cp);
      renderTile(cp);
    }
    renderLegend();
    sample();
    renderSessions();
    renderDrivers();
  }

  // --- power chart -----------------------------------------------------------------------

  const history = []; // [{t, total, kw: {cpId: kW}}]
  const cpColour = new Map();

  function colourOf(id) {
    if (!cpColour.has(id)) cpColour.set(id, PALETTE[cpColour.size % PALETTE.length]);
    return cpColour.get(id);
  }

  function sample() {
    const now = Date.now() / 1000;
    const kw = {};
    let total = 0;
    for (const cp of cps.values()) {
      if (cp.state === "SUMINISTRANDO" || num(cp.kw) > 0) {
        kw[cp.id] = num(cp.kw);
        total += num(cp.kw);
      }
    }
    const point = { t: now, total, kw };
    // Pushes come about once a second; fold bursts into one sample.
    if (history.length && now - history[history.length - 1].t < 0.5) history[history.length - 1] = point;
    else history.push(point);
    while (history.length && now - history[0].t > CHART_SPAN + 5) history.shift();
    $("total-power").textContent = `total ${EV.kw(total)}`;
  }

  function drawChart() {
    const canvas = $("power-chart");
    if (!canvas.clientWidth) return;
    const ids = new Set();
    for (const p of history) for (const id of Object.keys(p.kw)) ids.add(id);
    const series = [{ label: "total", colour: TOTAL_COLOUR, points: history.map((p) => [p.t, p.total]) }];
    for (const id of [...ids].sort()) {
      series.push({ label: id, colour: colourOf(id), points: history.map((p) => [p.t, p.kw[id] || 0]) });
    }
    EV.drawChart(canvas, series, { span: CHART_SPAN, unit: "(kW)" });
    const latest = history.length ? history[history.length - 1] : { total: 0, kw: {} };
    replace($("chart-legend"), series.map((s) => {
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = s.colour; // CSSOM, allowed by the CSP (no inline style="")
      const value = s.label === "total" ? latest.total : latest.kw[s.label] || 0;
      return el("li", {}, swatch, s.label === "total" ? "Total" : s.label, " ", EV.kw(value));
    }));
  }

  // --- sessions and drivers --------------------------------------------------------------

  function liveCpFor(session) {
    const cp = cps.get(session.cp_id);
    return cp && cp.session_id === session.id ? cp : null;
  }

  function sessionRow(s, live) {
    const cp = live ? liveCpFor(s) : null;
    const kwhValue = cp ? cp.kwh : s.kwh;
    const amount = cp ? cp.amount_eur : s.amount_eur;
    const start = s.started_at || s.authorized_at || s.requested_at;
    const end = s.ended_at || (live ? Date.now() / 1000 : null);
    const status = /^[A-Z_]+$/.test(s.status || "") ? s.status : "other";
    return el("tr", { dataset: { session: s.id, status: s.status } },
      el("td", {}, el("b", {}, s.cp_id)),
      el("td", {}, s.driver_id),
      el("td", {}, el("span", { class: `badge s-${status}` }, s.status),
        s.ticket_revision > 1 ? el("span", { class: "badge rev", title: "corrected ticket" }, `rev ${s.ticket_revision}`) : null),
      el("td", { class: "num" }, num(kwhValue).toFixed(4)),
      el("td", { class: "num" }, s.price_eur_kwh == null ? "–" : num(s.price_eur_kwh).toFixed(2)),
      el("td", { class: "num" }, EV.euro(amount)),
      el("td", { class: "reason" }, s.reason ? s.reason.replaceAll("_", " ") : live ? "in progress" : "–"),
      el("td", {}, EV.time(start)),
      el("td", {}, s.ended_at ? EV.time(s.ended_at) : "–"),
      el("td", { class: "num" }, start && end ? EV.duration(end - start) : "–"));
  }

  function renderSessions() {
    const live = sessions.filter((s) => !FINISHED.has(s.status) && !s.ended_at);
    const done = sessions.filter((s) => FINISHED.has(s.status) || s.ended_at);
    replace($("sessions-live"), live.map((s) => sessionRow(s, true)));
    replace($("sessions-done"), done.map((s) => sessionRow(s, false)));
    $("sessions-empty").hidden = sessions.length > 0;
    $("sessions-count").textContent = `${live.length} in progress · ${done.length} recent`;
  }

  function renderDrivers() {
    const busy = new Map();
    for (const cp of cps.values()) if (cp.driver_id) busy.set(cp.driver_id, cp);
    replace($("drivers"), drivers.map((d) => {
      const cp = busy.get(d.id);
      const balance = num(d.balance_eur);
      return el("tr", { dataset: { driver: d.id } },
        el("td", {}, el("b", {}, d.id)),
        el("td", {}, cp ? el("span", { class: "now-supplying" }, `${cp.id} · ${EV.kw(cp.kw)}`) : "–"),
        el("td", { class: `num balance${balance < 5 ? " low" : ""}` }, EV.euro(balance)));
    }));
  }

  // --- events ----------------------------------------------------------------------------

  function eventItem(e, fresh) {
    const kind = String(e.kind || "event");
    return el("li", { class: fresh ? "new" : "", dataset: { kind } },
      el("time", {}, EV.time(e.ts)),
      el("span", { class: `kind ${EVENT_KIND[kind] || ""}` }, kind),
      el("span", { class: "text" }, e.text));
  }

  function addEvent(e) {
    const list = $("events");
    list.prepend(eventItem(e, true));
    while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  }

  // --- audit log -------------------------------------------------------------------------

  const MAX_AUDIT = 200;
  const AUDIT_OUTCOME = { ok: "good", failed: "bad", blocked: "bad", locked: "bad", refused: "bad" };
  const audit = new Map(); // id -> entry, as the server sent it

  function auditRow(a, fresh) {
    const outcome = String(a.outcome ?? "");
    const tone = Object.hasOwn(AUDIT_OUTCOME, outcome) ? AUDIT_OUTCOME[outcome] : "";
    return el("tr", { class: fresh ? "new" : "", dataset: { audit: String(a.id), action: String(a.action ?? ""), outcome } },
      el("td", { class: "num" }, a.id),
      el("td", {}, el("time", {}, a.ts ? new Date(a.ts * 1000).toLocaleString() : "–")),
      el("td", { class: "source" }, a.source || "–"),
      el("td", {}, a.actor || "–"),
      el("td", {}, el("span", { class: "kind info" }, a.action)),
      el("td", {}, el("span", { class: `kind ${tone}` }, outcome)),
      el("td", { class: "detail", title: a.hash ? `chain hash ${a.hash}` : null }, a.detail || ""));
  }

  function renderAuditCount() {
    $("audit-empty").hidden = audit.size > 0;
    $("audit-count").textContent = `${audit.size} shown · append-only, hash-chained · newest first`;
  }

  function setAudit(list) {
    audit.clear();
    for (const a of list) if (Number.isInteger(a.id)) audit.set(a.id, a);
    const newest = [...audit.values()].sort((x, y) => y.id - x.id).slice(0, MAX_AUDIT);
    replace($("audit"), newest.map((a) => auditRow(a, false)));
    renderAuditCount();
  }

  function addAudit(a) {
    if (!Number.isInteger(a.id) || audit.has(a.id)) return;
    audit.set(a.id, a);
    $("audit").prepend(auditRow(a, true));
    const body = $("audit");
    while (body.children.length > MAX_AUDIT) {
      audit.delete(Number(body.lastChild.dataset.audit));
      body.lastChild.remove();
    }
    renderAuditCount();
  }

  // --- system status ---------------------------------------------------------------------

  function renderStatus(status) {
    if (!status) return;
    $("status-broker").dataset.ok = String(Boolean(status.broker));
    $("status-database").dataset.ok = String(Boolean(status.database));
    const connected = num(status.monitors_connected);
    const registered = num(status.cps_registered);
    $("monitors-count").textContent = `${connected}/${registered}`;
    $("status-monitors").dataset.ok = registered && connected === registered ? "true" : connected ? "partial" : "unknown";
    $("status-broker").title = status.broker ? "Kafka broker reachable" : "Kafka broker unreachable";
    $("status-database").title = status.database ? "database reachable" : "database unreachable";
    renderRole(status.role, status.cluster);
    renderClocks(status.clocks);
  }

  // With --ha: this Central's role, and the Kafka cluster (brokers, copies, Centrals in the lease group).
  function renderRole(role, cluster) {
    const ha = role === "active" || role === "standby";
    $("status-role").hidden = !ha;
    $("status-cluster").hidden = !ha || !cluster;
    if (!ha) return;
    $("role-text").textContent = role === "active" ? "Active Central" : "Standby Central";
    $("status-role").dataset.ok = role === "active" ? "true" : "partial";
    if (!cluster) return;
    if (!cluster.reachable) {
      $("cluster-text").textContent = "unreachable";
      $("status-cluster").dataset.ok = "false";
      return;
    }
    const brokers = num(cluster.brokers);
    const under = num(cluster.under_replicated);
    const centrals = num(cluster.centrals);
    $("cluster-text").textContent = `${brokers} brokers · ${under} under-replicated · ${centrals} Centrals`;
    $("status-cluster").dataset.ok = under === 0 && brokers >= 3 ? "true" : "partial";
    $("status-cluster").title =
      `${brokers} brokers up; ${under} of ${num(cluster.partitions)} partitions miss a copy; ` +
      `${centrals} Centrals in the lease group (one active)`;
  }

  // --- clocks ----------------------------------------------------------------------------

  // Offsets are "that clock minus the network's" (the Kafka brokers'): +60 s is a minute ahead.
  const CLOCK_FIX = "Fix: timedatectl set-ntp true (Linux) or w32tm /resync (Windows).";
  const CENTRAL_VIA = "broker probes";

  const isNumber = (v) => typeof v === "number" && Number.isFinite(v);

  // "+60.0 s", "−0.3 s" (a real minus sign), "–" when not measured yet.
  function signedSeconds(v) {
    if (!isNumber(v)) return "–";
    const tenths = Math.round(v * 10) / 10;
    return `${tenths < 0 ? "−" : "+"}${Math.abs(tenths).toFixed(1)} s`;
  }

  const millis = (v) => (isNumber(v) ? v.toFixed(1) : "–");
  const heard = (age) => (isNumber(age) ? `${age.toFixed(1)} s ago` : "–");

  // Central first, then every peer, each as {kind, id, label, via, offset_s, ...}.
  function clockRows(clocks) {
    const central = clocks.central || {};
    const rows = [{
      kind: "central", id: "central", label: "Central (this)", shownId: "–", via: CENTRAL_VIA,
      offset_s: central.offset_s, round_trip_ms: central.round_trip_ms, age_s: null,
      warning: Boolean(central.warning),
    }];
    for (const p of Array.isArray(clocks.peers) ? clocks.peers : []) {
      rows.push({
        kind: String(p.kind ?? ""), id: String(p.id ?? ""), label: String(p.kind ?? ""),
        shownId: String(p.id ?? ""), via: String(p.via ?? ""), offset_s: p.offset_s,
        round_trip_ms: p.round_trip_ms, age_s: p.age_s, warning: Boolean(p.warning),
      });
    }
    return rows;
  }

  function clockRow(r) {
    return el("tr", { class: r.warning ? "warn" : "", dataset: { kind: r.kind, id: r.id } },
      el("td", { class: "clock-who" }, r.label),
      el("td", {}, el("b", {}, r.shownId)),
      el("td", { class: "num offset" }, signedSeconds(r.offset_s)),
      el("td", { class: "via" }, r.via || "–"),
      el("td", { class: "num" }, isNumber(r.round_trip_ms) ? `${r.round_trip_ms.toFixed(1)} ms` : "–"),
      el("td", { class: "num" }, heard(r.age_s)));
  }

  // One line naming the clock furthest off, and how many others are off too (`offCount`:
  // every clock off, listed or not).
  function clockWarning(rows, offCount) {
    const off = rows.filter((r) => r.warning && isNumber(r.offset_s))
      .sort((a, b) => Math.abs(b.offset_s) - Math.abs(a.offset_s));
    if (!off.length) return "";
    const worst = off[0];
    const who = worst.kind === "central" ? "Central (this one)" : `${worst.label} ${worst.shownId}`;
    const how = worst.offset_s > 0 ? "ahead of" : "behind";
    const others = Math.max(off.length, offCount) - 1;
    const more = others > 0 ? ` (+${others} more)` : "";
    return `Clock off: ${who} is ${Math.abs(worst.offset_s).toFixed(1)} s ${how} the network's clock${more}. ${CLOCK_FIX}`;
  }

  function hopRow(h) {
    return el("tr", { dataset: { hop: String(h.hop ?? "") } },
      el("td", {}, String(h.hop ?? "")),
      el("td", { class: "num" }, num(h.n)),
      el("td", { class: "num" }, millis(h.p50_ms)),
      el("td", { class: "num" }, millis(h.p95_ms)),
      el("td", { class: "num" }, millis(h.last_ms)));
  }

  function renderClocks(clocks) {
    $("clocks-panel").hidden = !clocks;
    const banner = $("clock-warning");
    if (!clocks) {
      banner.hidden = true;
      return;
    }
    const rows = clockRows(clocks);
    replace($("clocks"), rows.map(clockRow));
    replace($("hops"), (Array.isArray(clocks.hops) ? clocks.hops : []).map(hopRow));
    const threshold = isNumber(clocks.threshold_s) ? clocks.threshold_s : 2;
    const listed = rows.length - 1;
    const measured = isNumber(clocks.peers_measured) ? clocks.peers_measured : listed;
    const offPeers = isNumber(clocks.peers_off) ? clocks.peers_off : 0;
    // With many CPs only the clocks off and the furthest off are listed (all in /metrics).
    const shown = measured > listed ? ` · the ${listed} furthest off of ${measured}` : "";
    $("clock-note").textContent =
      `offset to the network's clock (the Kafka brokers') · warning at ±${threshold} s${shown}`;
    const text = clockWarning(rows, offPeers + (rows[0].warning ? 1 : 0));
    banner.textContent = text;
    banner.hidden = !text;
  }

  // --- commands --------------------------------------------------------------------------

  function nextRef(kind) {
    refSeq += 1;
    return `${kind}-${Date.now().toString(36)}-${refSeq}`;
  }

  function showResult(node, ok, text) {
    node.textContent = text;
    node.className = node.className.replace(/\b(ok|error)\b/g, "").trim() + (ok ? " ok" : " error");
  }

  function sendCommand(message, kind, target) {
    const ref = nextRef(kind);
    if (!socket || !socket.send({ ...message, ref })) {
      showResult(target, false, "Not connected to Central: try again when the panel is live.");
      return false;
    }
    const timer = setTimeout(() => {
      if (pending.delete(ref)) showResult(target, false, "No answer from Central.");
      if (kind === "register") $("reg-submit").disabled = false;
    }, 10000);
    pending.set(ref, { kind, target, timer });
    return true;
  }

  // A CP's secret arrives once, in the result of register_cp or reset_secret, to this page
  // only: show it until the admin has copied it.
  function showSecret(cpId, secret) {
    $("secret-cp").textContent = cpId;
    $("secret-value").textContent = secret;
    $("secret-box").hidden = false;
  }

  function hideSecret() {
    $("secret-value").textContent = "";
    $("secret-cp").textContent = "";
    $("secret-box").hidden = true;
  }

  function onResult(message) {
    const entry = pending.get(message.ref);
    if (entry && message.ok && typeof message.secret === "string") {
      showSecret((message.cps || [])[0] || "", message.secret);
    }
    if (!entry) {
      if (!message.ok) showResult($("command-result"), false, `Refused: ${message.detail}`);
      return;
    }
    pending.delete(message.ref);
    clearTimeout(entry.timer);
    if (entry.kind === "register") {
      $("reg-submit").disabled = false;
      if (message.ok) {
        showResult(entry.target, true, `✓ ${message.detail}`);
        $("reg-id").value = "";
        $("reg-location").value = "";
        for (const id of message.cps || []) flash(id);
      } else {
        showResult(entry.target, false, `✗ ${message.detail}`);
      }
    } else {
      const count = (message.cps || []).length;
      showResult(entry.target, message.ok, message.ok
        ? `✓ ${message.detail}${count > 1 ? ` (${count} CPs)` : ""}`
        : `✗ ${message.detail}`);
    }
  }

  function flash(id) {
    const t = tiles.get(id);
    if (!t) return;
    t.root.classList.add("flash");
    setTimeout(() => t.root.classList.remove("flash"), 1500);
  }

  function bindControls() {
    $("cps").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action]");
      if (!button || button.disabled) return;
      const { action, target } = button.dataset;
      if (action === "revoke_key" || action === "reset_secret") {
        // Two clicks: the first arms the button for a few seconds, the second sends.
        if (!button.classList.contains("confirm")) {
          const label = button.textContent;
          button.classList.add("confirm");
          button.textContent = "Sure? Click again";
          setTimeout(() => { button.classList.remove("confirm"); button.textContent = label; }, 4000);
          return;
        }
        sendCommand({ type: action, target }, "key", $("command-result"));
        return;
      }
      sendCommand({ type: "command", action, target }, "command", $("command-result"));
    });
    $("secret-done").addEventListener("click", hideSecret);
    $("stop-all").addEventListener("click", () => {
      sendCommand({ type: "command", action: "stop", target: "all" }, "command", $("command-result"));
    });
    $("resume-all").addEventListener("click", () => {
      sendCommand({ type: "command", action: "resume", target: "all" }, "command", $("command-result"));
    });
    $("register-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const result = $("register-result");
      const message = {
        type: "register_cp",
        id: $("reg-id").value.trim(),
        location: $("reg-location").value.trim(),
        price_eur_kwh: Number($("reg-price").value),
        max_kw: Number($("reg-max-kw").value),
      };
      if (!message.id || !message.location) {
        showResult(result, false, "Id and location are required.");
        return;
      }
      if (sendCommand(message, "register", result)) {
        $("reg-submit").disabled = true;
        showResult(result, true, "Registering…");
      }
    });
  }

  // --- the WebSocket ---------------------------------------------------------------------

  function onMessage(message) {
    switch (message.type) {
      case "snapshot":
        applyCps(message.cps || [], true);
        sessions = message.sessions || [];
        drivers = message.drivers || [];
        renderSessions();
        renderDrivers();
        replace($("events"), (message.events || []).slice(-MAX_EVENTS).reverse().map((e) => eventItem(e, false)));
        renderStatus(message.status);
        setAudit(message.audit || []);
        setWeather(message.weather || []);
        drawChart();
        break;
      case "cps": // `full` after a CP was deregistered: the others are dropped
        applyCps(message.cps || [], Boolean(message.full));
        drawChart();
        break;
      case "event":
        if (message.event) addEvent(message.event);
        break;
      case "audit":
        if (message.entry) addAudit(message.entry);
        break;
      case "sessions":
        sessions = message.sessions || [];
        renderSessions();
        break;
      case "drivers":
        drivers = message.drivers || [];
        renderDrivers();
        break;
      case "status":
        renderStatus(message.status);
        break;
      case "weather":
        setWeather(message.weather || []);
        break;
      case "result":
        onResult(message);
        break;
      default:
        break;
    }
  }

  // --- logging in ------------------------------------------------------------------------

  let loginForm = null;

  function showLogin(reason) {
    if (socket) { socket.close(); socket = null; }
    hideSecret();
    $("app").hidden = true;
    $("who").hidden = true;
    $("logout").hidden = true;
    $("login-view").hidden = false;
    loginForm.show(reason);
    $("login-user").focus();
  }

  function enter(who) {
    if (who.role !== "admin") {
      EVAuth.logout();
      showLogin(`${who.user} is not an administrator: this panel is for admins only.`);
      return;
    }
    $("login-view").hidden = true;
    $("app").hidden = false;
    $("who").textContent = who.user;
    $("who").hidden = false;
    $("logout").hidden = false;
    if (!socket) socket = EV.connect("/ws", onMessage, null, { onDrop: stillLoggedIn });
    drawChart();
  }

  // After a drop: reconnect while the session lives (Central away: whoami throws, retry);
  // once the session is gone (logout elsewhere, expiry, Central restarted) ask for a login.
  async function stillLoggedIn() {
    const who = await EVAuth.whoami();
    if (who && who.role === "admin") return true;
    socket = null;
    showLogin("Your session ended: please log in again.");
    return false;
  }

  function bindLogin() {
    loginForm = EVAuth.bindForm({
      form: $("login-form"),
      user: $("login-user"),
      password: $("login-password"),
      submit: $("login-submit"),
      error: $("login-error"),
      onLogin: enter,
    });
    $("logout").addEventListener("click", async () => {
      await EVAuth.logout();
      showLogin("");
    });
  }

  async function start() {
    renderLegend();
    bindControls();
    bindLogin();
    let who = null;
    try { who = await EVAuth.whoami(); } catch { who = null; }
    if (who) enter(who);
    else showLogin("");
    // While the link is down everything on screen is stale: say so instead of looking healthy.
    const connection = $("connection");
    const markStale = () => {
      const online = connection.classList.contains("online");
      document.body.classList.toggle("stale", !online);
      if (!online) {
        for (const id of ["status-broker", "status-database", "status-monitors"]) $(id).dataset.ok = "unknown";
      }
    };
    new MutationObserver(markStale).observe(connection, { attributes: true, attributeFilter: ["class"] });
    markStale();
    // Keep the chart moving (and durations counting) between pushes.
    setInterval(() => {
      const last = history[history.length - 1];
      const online = $("connection").classList.contains("online");
      if (online && (!last || Date.now() / 1000 - last.t >= 0.9)) sample();
      drawChart();
      if (sessions.some((s) => !FINISHED.has(s.status) && !s.ended_at)) renderSessions();
    }, 1000);
    window.addEventListener("resize", drawChart);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
