// The site dashboard: renders what /ws pushes (a snapshot, then the site twice a second).
// Everything goes into the DOM as text through EV.el; no innerHTML anywhere.
"use strict";

(() => {
  const { el, replace } = EV;
  const PALETTE = ["#2458d6", "#d9342b", "#1e9e4a", "#f08c00", "#7a3fc4", "#0f9aa8", "#c2418f", "#5d6470"];
  const STATE_NAMES = {
    ACTIVADO: "Activado",
    SUMINISTRANDO: "Suministrando",
    PARADO: "Parado",
    AVERIADO: "Averiado",
    DESCONECTADO: "Desconectado",
  };

  let rtt = {}; // cp id -> [[t, ms], ...] (server time)
  let offset = 0; // server clock minus this browser's clock, seconds
  let last = null;

  const $ = (id) => document.getElementById(id);
  const colourIndex = (cpId, ids) => Math.max(0, ids.indexOf(cpId)) % PALETTE.length;

  function pct(v) {
    if (v === null || v === undefined) return "–";
    const p = v * 100;
    return (p >= 99.95 || p === 0 ? p.toFixed(0) : p.toFixed(1)) + " %";
  }

  // 24-hour HH:MM:SS whatever the browser's locale: short enough for the cards.
  function clock(ts) {
    if (!ts) return "–";
    const d = new Date(ts * 1000);
    return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
  }

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "";
    return seconds < 1 ? "just now" : `${EV.duration(seconds)} ago`;
  }

  function availabilityClass(v) {
    if (v === null || v === undefined) return "none";
    if (v >= 0.999) return "up";
    if (v >= 0.9) return "part";
    return "down";
  }

  function metric(label, value, sub, cls) {
    return el("div", { class: `metric ${cls || ""}` },
      el("span", { class: "label" }, label),
      el("span", { class: "value" }, value),
      sub ? el("span", { class: "sub" }, sub) : null);
  }

  // "+60.0 s", "−0.3 s" (a real minus sign), "–" when not measured.
  function signedSeconds(v) {
    if (typeof v !== "number" || !Number.isFinite(v)) return "–";
    const tenths = Math.round(v * 10) / 10;
    return `${tenths < 0 ? "−" : "+"}${Math.abs(tenths).toFixed(1)} s`;
  }

  // The monitor's and the engine's clocks against the network's (the Kafka brokers').
  function clockLine(cp) {
    const known = (v) => typeof v === "number" && Number.isFinite(v);
    if (!known(cp.monitor_offset_s) && !known(cp.engine_offset_s)) return null;
    const warn = Boolean(cp.clock_warning);
    return el("div", {
      class: `cp-clock${warn ? " warn" : ""}`,
      dataset: { field: "clock", warning: String(warn) },
      title: warn
        ? "A clock is off: set it right with timedatectl set-ntp true (Linux) or w32tm /resync (Windows)"
        : "Offsets to the network's clock (the Kafka brokers')",
    },
      el("span", { class: "label" }, "Clock"),
      el("span", { class: "offsets" },
        el("span", { dataset: { clock: "monitor" } }, `monitor ${signedSeconds(cp.monitor_offset_s)}`),
        " · ",
        el("span", { dataset: { clock: "engine" } }, `engine ${signedSeconds(cp.engine_offset_s)}`)),
      warn ? el("span", { class: "clock-note", role: "img", "aria-label": "clock off" }, "⚠") : null);
  }

  function statePill(state) {
    if (!state) return el("span", { class: "pill state-none" }, "unknown at Central");
    return el("span", { class: `pill state-${state}`, title: STATE_NAMES[state] || state }, state);
  }

  function strip(cp, windowS) {
    const minutes = Math.round(windowS / 60 / cp.strip.length) || 1;
    const bars = cp.strip.map((v, i) => {
      const age = (cp.strip.length - i) * minutes;
      const what = v === null ? "no data" : `${pct(v)} available`;
      return el("span", { class: `b b-${availabilityClass(v)}`, title: `${age} min ago: ${what}` });
    });
    return el("div", { class: "strip", role: "img", "aria-label": "availability over the last hour, minute by minute" }, bars);
  }

  function engineLine(cp) {
    if (cp.monitor === "lost") return ["?", "monitor lost", "unknown"];
    if (cp.engine === "OK") return ["OK", "", "ok"];
    if (cp.engine === "KO") return ["KO", cp.detail || "engine reports KO", "ko"];
    return ["–", "", "unknown"];
  }

  function cpCard(cp, windowS) {
    const [engineValue, engineSub, engineCls] = engineLine(cp);
    const linkValue = cp.central_ok === null ? "–" : cp.central_ok ? "OK" : "down";
    const linkCls = cp.central_ok === null ? "unknown" : cp.central_ok ? "ok" : "ko";
    const monitorNote = cp.monitor === "lost"
      ? el("div", { class: "cp-alert lost" }, `Monitor lost: no health sample for ${EV.duration(cp.silent_s)}`)
      : null;
    const fault = cp.fault && cp.monitor !== "lost"
      ? el("div", { class: "cp-alert ko" },
          `${cp.fault.label} since ${clock(cp.fault.started_at)} (${EV.duration(cp.fault.duration_s)})`,
          cp.fault.detail ? el("span", { class: "detail" }, ` · ${cp.fault.detail}`) : null)
      : null;
    const supply = cp.state === "SUMINISTRANDO"
      ? el("div", { class: "cp-supply" },
          el("span", { class: "supply-tag" }, "Supplying"),
          el("span", { class: "num" }, EV.kw(cp.kw)),
          el("span", { class: "num" }, EV.kwh(cp.kwh)))
      : cp.reserved && cp.state === "ACTIVADO"
        ? el("div", { class: "cp-supply", dataset: { field: "reserved" } },
            el("span", { class: "supply-tag" }, "Reserved"),
            el("span", {}, "for a driver who has not plugged in yet"))
        : null;
    const price = cp.price_eur_kwh !== null && cp.price_eur_kwh !== undefined
      ? `${Number(cp.price_eur_kwh).toFixed(2)} €/kWh · ${Number(cp.max_kw || 0).toFixed(1)} kW` : "";
    const simulated = EV.simulated(cp.speed);
    return el("article", {
      class: `cp cp-${cp.monitor} engine-${cp.engine}`,
      dataset: { cp: cp.id, state: cp.state || "UNKNOWN", engine: cp.engine, monitor: cp.monitor },
    },
      el("header", { class: `cp-head head-${cp.state || "none"}` },
        el("div", { class: "cp-title" },
          el("span", { class: "cp-id" }, cp.id),
          el("span", { class: "cp-loc" }, cp.location || "location unknown"),
          price ? el("span", { class: "cp-price" }, price) : null,
          simulated ? el("span", { class: "sim-time", dataset: { field: "speed" } }, simulated) : null),
        statePill(cp.state)),
      el("div", { class: "cp-health" },
        metric("Engine", engineValue, engineSub, `engine ${engineCls}`),
        metric("Central link", linkValue, cp.central_ok === false ? "monitor cannot reach Central" : "", `link ${linkCls}`),
        metric("Round trip", cp.rtt_ms === null || cp.monitor === "lost" ? "–" : `${Number(cp.rtt_ms).toFixed(1)} ms`, "health check", "rtt"),
        metric("Last check", clock(cp.last_check), ago(cp.silent_s), `last ${cp.monitor === "lost" ? "ko" : ""}`)),
      clockLine(cp),
      monitorNote,
      fault,
      supply,
      el("div", { class: "avail", dataset: { availability: cp.availability === null ? "" : String(cp.availability) } },
        el("div", { class: "avail-head" },
          el("span", {}, "Availability, last hour"),
          el("span", { class: "avail-meta" },
            cp.faults_last_hour ? `${cp.faults_last_hour} fault${cp.faults_last_hour > 1 ? "s" : ""} · ` : "",
            cp.observed_s < windowS - 1 ? `over ${EV.duration(cp.observed_s)}` : ""),
          el("strong", { class: `avail-value a-${availabilityClass(cp.availability)}` }, pct(cp.availability))),
        strip(cp, windowS),
        el("div", { class: "strip-axis" }, el("span", {}, "−60 min"), el("span", {}, "−30 min"), el("span", {}, "now"))));
  }

  function timelineItem(f) {
    const end = f.open ? "ongoing" : clock(f.ended_at);
    return el("li", {
      class: `fault ${f.open ? "open" : "closed"} kind-${f.kind}`,
      dataset: { fault: f.kind, faultCp: f.cp_id, open: String(f.open) },
    },
      el("span", { class: "dot", "aria-hidden": "true" }),
      el("div", { class: "what" },
        el("strong", {}, f.cp_id), " ",
        el("span", { class: "kind" }, f.label),
        el("span", { class: "status" }, f.open ? "open" : "recovered"),
        f.detail ? el("div", { class: "detail" }, f.detail) : null),
      el("div", { class: "when" }, `${clock(f.started_at)} → ${end}`),
      el("div", { class: "dur", title: "duration" }, EV.duration(f.duration_s)));
  }

  function renderSummary(site) {
    const s = site.summary;
    $("kpi-monitored").textContent = String(s.monitored);
    $("kpi-ok").textContent = `${s.engine_ok}/${s.monitored}`;
    $("kpi-faults").textContent = String(s.open_faults);
    $("kpi-lost").textContent = String(s.monitor_lost);
    const values = site.cps.filter((c) => c.monitored && c.availability !== null).map((c) => c.availability);
    $("kpi-availability").textContent = values.length ? pct(values.reduce((a, b) => a + b, 0) / values.length) : "–";
    document.querySelector(".kpi-bad").classList.toggle("alert", s.open_faults > 0);
    document.querySelector(".kpi-lost").classList.toggle("alert", s.monitor_lost > 0);
    $("silence").textContent = String(site.silence_s);
    if (typeof site.clock_warning_s === "number") $("clock-threshold").textContent = String(site.clock_warning_s);
    const feed = $("feed");
    const st = site.status || {};
    feed.textContent = !st.consuming ? "Kafka unreachable: retrying" : st.ready ? "Kafka: live" : "Kafka: reading the last hour…";
    feed.className = `feed ${st.consuming ? (st.ready ? "ok" : "busy") : "bad"}`;
  }

  function renderChart(ids) {
    const now = Date.now() / 1000;
    const series = ids.filter((id) => rtt[id] && rtt[id].length).map((id) => ({
      label: id,
      colour: PALETTE[colourIndex(id, ids)],
      points: rtt[id].map(([t, v]) => [t - offset, v]).filter(([t]) => now - t <= 120),
    }));
    EV.drawChart($("rtt-chart"), series, { span: 120, unit: "ms" });
    replace($("rtt-legend"), series.map((s) =>
      el("span", { class: "legend-item" }, el("span", { class: `sw sw-${colourIndex(s.label, ids)}` }), s.label)));
  }

  function mergeRtt(incoming, full) {
    if (full) rtt = {};
    for (const [id, points] of Object.entries(incoming || {})) {
      const have = rtt[id] || (rtt[id] = []);
      const lastT = have.length ? have[have.length - 1][0] : -Infinity;
      for (const p of points) if (p[0] > lastT) have.push(p);
    }
    const horizon = Date.now() / 1000 + offset - 125;
    for (const id of Object.keys(rtt)) rtt[id] = rtt[id].filter(([t]) => t >= horizon);
  }

  function render(site) {
    renderSummary(site);
    const monitored = site.cps.filter((c) => c.monitored);
    const others = site.cps.filter((c) => !c.monitored);
    replace($("cps"), monitored.length
      ? monitored.map((cp) => cpCard(cp, site.window_s))
      : el("p", { class: "muted empty" }, "No monitor has reported yet: start the monitors with --broker."));
    replace($("timeline"), site.timeline.length
      ? site.timeline.map(timelineItem)
      : el("li", { class: "fault none muted" }, "No faults in the last hour."));
    $("others-card").classList.toggle("hidden", others.length === 0);
    replace($("others"), others.map((cp) =>
      el("span", { class: "chip", dataset: { other: cp.id, state: cp.state || "UNKNOWN" } },
        el("span", { class: `dot-state state-${cp.state || "none"}`, title: cp.state || "unknown" }),
        el("strong", {}, cp.id),
        el("span", { class: "chip-loc" }, cp.location || ""),
        el("span", { class: "chip-state" }, cp.state || "–"))));
    renderChart(monitored.map((c) => c.id));
  }

  function onMessage(message) {
    if (message.type === "snapshot" || message.type === "site") {
      offset = message.now - Date.now() / 1000;
      mergeRtt(message.rtt, message.type === "snapshot");
      last = message;
      render(message);
    } else if (message.type === "error") {
      console.warn("site dashboard:", message.detail);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    EV.connect("/ws", onMessage);
    window.addEventListener("resize", () => { if (last) renderChart(last.cps.filter((c) => c.monitored).map((c) => c.id)); });
  });
})();
