// The driver dashboard's page: login, CPs, the live supply, tickets, history, file runs.
// Every value from the server is inserted as text (EV.el / textContent), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const MAX_MESSAGE = 64 * 1024;
  const PHASES = {
    requested: ["Requested", "Asked Central for a supply; waiting for its answer…"],
    accepted: ["Accepted", "Accepted by Central; waiting for the charging point to authorise…"],
    authorized: ["Authorised", "Authorised: plug your car in to start charging."],
    supplying: ["Charging", "Charging. Stop whenever you like; the ticket follows."],
    ended: ["Finished", "Finished: your ticket is below."],
    denied: ["Denied", ""],
    failed: ["Failed", ""],
  };
  const STEPS = ["requested", "accepted", "authorized", "supplying", "ended"];
  const REASONS = {
    unplugged: "unplugged",
    engine_fault: "charging point fault",
    engine_lost: "charging point lost",
    monitor_lost: "charging point monitor lost",
    stopped_by_admin: "stopped by Central",
    weather: "stopped for the weather (frost)",
    driver_stop: "stopped by you",
    balance_exhausted: "balance exhausted",
    authorization_expired: "not plugged in time",
    unknown_driver: "unknown driver",
    unknown_cp: "unknown charging point",
    cp_unavailable: "charging point not available",
    insufficient_balance: "balance too low",
    driver_busy: "you already have a supply in progress",
    request_expired: "request expired",
    cp_refused: "the charging point refused the authorisation",
    cp_no_answer: "the charging point did not answer",
  };
  const RUN_STATUS = {
    pending: "waiting", requested: "requested", accepted: "accepted",
    authorized: "authorised", supplying: "charging", ticket: "ticket", denied: "denied",
    error: "error", cancelled: "cancelled",
  };

  const state = {
    driver: null,
    supply: null,
    offset: 0, // server clock minus this browser's clock, in seconds
    run: null,
    cps: null,
    link: null,
  };
  const send = (message) => Boolean(state.link && state.link.send(message));
  const nowServer = () => Date.now() / 1000 + state.offset;
  const reasonText = (r) => REASONS[r] || r || "";
  const cents = (eur) => Math.round((Number(eur) || 0) * 100);

  // --- messages from the server ------------------------------------------------------------

  function onMessage(msg) {
    switch (msg.type) {
      case "session": return onSession(msg);
      case "cps": return renderCps(msg.cps);
      case "balance": return renderBalance(msg.balance_eur);
      case "supply": return onSupply(msg.supply);
      case "progress": return onProgress(msg);
      case "ticket": return onTicket(msg);
      case "history": renderBalance(msg.balance_eur); return renderHistory(msg.tickets);
      case "run": state.run = msg.run; return renderRun();
      case "notice": return note(msg.text, msg.level === "error" ? "error" : "info");
      case "error": return note(msg.detail, "error", true);
      default: return undefined;
    }
  }

  // --- login: /login, then the HttpOnly session cookie, then /ws (shared ev.auth.js) ------

  // The server binds the connection to the session's driver and says so first.
  function onSession(msg) {
    state.driver = msg.driver_id;
    $("login-view").hidden = true;
    $("app").hidden = false;
    $("who").hidden = false;
    $("who").textContent = msg.driver_id;
    $("logout").hidden = false;
    note(`logged in as ${msg.driver_id}`);
  }

  function enter() {
    if (!state.link) state.link = EV.connect("/ws", onMessage, null, { onDrop: stillLoggedIn });
  }

  // After a drop: reconnect while the session lives (the dashboard away: whoami throws,
  // retry); once it is gone (logout, expiry, the dashboard restarted) ask for a login again.
  async function stillLoggedIn() {
    if (await EVAuth.whoami()) return true;
    state.link = null;
    showLogin("Your session ended: please log in again.");
    return false;
  }

  function showLogin(reason) {
    if (state.link) { state.link.close(); state.link = null; }
    state.driver = null;
    $("app").hidden = true;
    $("who").hidden = true;
    $("logout").hidden = true;
    $("balance-chip").hidden = true;
    $("login-view").hidden = false;
    loginForm.show(reason);
  }

  const loginForm = EVAuth.bindForm({
    form: $("login-form"),
    user: $("login-driver"),
    password: $("login-password"),
    submit: $("login-submit"),
    error: $("login-error"),
    onLogin: enter,
  });

  $("logout").addEventListener("click", async () => {
    await EVAuth.logout();
    showLogin("");
  });

  // --- charging points ---------------------------------------------------------------------

  function renderCps(cps) {
    const tiles = cps.map((cp) => {
      const clickable = cp.available && !busy();
      const cta = cp.mine ? "your supply"
        : cp.available ? "tap to charge"
        : cp.reserved ? "reserved for another driver"
        : cp.state === "PARADO" && cp.stop_reason ? `out of service: ${cp.stop_reason}` : "not available";
      return EV.el("button", {
        type: "button",
        class: `tile cp state-${cp.state}${cp.available ? " available" : ""}${cp.mine ? " mine" : ""}`,
        dataset: { cp: cp.cp_id, state: cp.state },
        disabled: !clickable,
        title: cp.available ? `Ask for a supply at ${cp.cp_id}`
          : cp.reserved && !cp.mine ? `${cp.cp_id} is reserved for another driver`
          : `${cp.cp_id} is ${cp.state}${cp.stop_reason ? " (" + cp.stop_reason + ")" : ""}`,
        onclick: () => requestSupply(cp.cp_id),
      },
      EV.el("div", { class: "tile-top" },
        EV.el("span", { class: "id" }, cp.cp_id),
        EV.el("span", { class: "state" }, cp.state)),
      EV.el("div", { class: "loc" }, cp.location),
      EV.el("div", { class: "meta" },
        `${Number(cp.price_eur_kwh).toFixed(2)} €/kWh · ${Number(cp.max_kw).toFixed(1)} kW`),
      EV.el("div", { class: "cta" }, cta));
    });
    EV.replace($("cps"), tiles);
    $("cps-empty").hidden = cps.length > 0;
    const free = cps.filter((cp) => cp.available).length;
    $("cps-count").textContent = `${free} of ${cps.length} available`;
    state.cps = cps;
    renderSimulated();
  }

  // A supply at a CP on a simulated clock says so beside its figures (the CP list knows).
  function renderSimulated() {
    const s = state.supply;
    const cp = s && state.cps ? state.cps.find((c) => c.cp_id === s.cp_id) : null;
    const text = cp ? EV.simulated(cp.speed) : null;
    $("supply-speed").textContent = text || "";
    $("supply-speed").hidden = !text;
  }

  function busy() {
    return Boolean((state.supply && state.supply.active) || (state.run && state.run.state === "running"));
  }

  function refreshTiles() {
    if (state.cps) renderCps(state.cps);
  }

  function requestSupply(cpId) {
    if (send({ type: "request", cp_id: cpId })) note(`asking for a supply at ${cpId}…`);
  }

  // --- the supply --------------------------------------------------------------------------

  function onSupply(supply) {
    state.supply = supply;
    if (supply) {
      state.offset = supply.now - Date.now() / 1000;
      supply.points = supply.points || [];
      const [label] = PHASES[supply.phase] || [supply.phase];
      if (supply.phase === "denied") note(`${supply.cp_id}: denied (${supply.detail})`, "error");
      else if (supply.phase === "failed") note(`${supply.cp_id}: ${supply.detail}`, "error");
      else note(`${supply.cp_id}: ${label.toLowerCase()}`);
    }
    renderSupply();
    refreshTiles();
  }

  function onProgress(msg) {
    const s = state.supply;
    if (!s || s.session_id !== msg.session_id) return;
    s.kw = msg.kw; s.kwh = msg.kwh; s.amount_eur = msg.amount_eur;
    s.points.push([msg.t, msg.kwh]);
    if (s.points.length > 3600) s.points.shift();
    renderFigures();
  }

  function renderSupply() {
    const s = state.supply;
    $("supply-empty").hidden = Boolean(s);
    $("supply-body").hidden = !s;
    const pill = $("supply-state");
    if (!s) {
      pill.textContent = "none";
      pill.className = "pill phase-none";
      $("stop-button").disabled = true;
      return;
    }
    const [label, text] = PHASES[s.phase] || [s.phase, ""];
    pill.textContent = label;
    pill.className = `pill phase-${s.phase}`;
    const price = s.price_eur_kwh != null ? ` · ${Number(s.price_eur_kwh).toFixed(2)} €/kWh` : "";
    EV.replace($("supply-cp"), EV.el("strong", {}, s.cp_id), price);
    renderSimulated();
    let message = text;
    if (s.phase === "denied") message = `Denied: ${reasonText(s.detail.split(":")[0])}${s.detail.includes(":") ? " (" + s.detail.split(":").slice(1).join(":").trim() + ")" : ""}`;
    else if (s.phase === "failed") message = s.detail;
    else if (s.phase === "ended") message = `Finished: ${reasonText(s.detail)}.`;
    else if (s.phase === "authorized" && s.expires_at) message += ` (until ${EV.time(s.expires_at - state.offset)})`;
    const box = $("supply-message");
    box.textContent = message;
    box.className = `supply-message${["denied", "failed"].includes(s.phase) ? " bad" : ""}`;
    const reached = s.phase === "denied" || s.phase === "failed" ? -1 : STEPS.indexOf(s.phase);
    for (const li of $("supply-steps").children) {
      const i = STEPS.indexOf(li.dataset.step);
      li.className = i < reached ? "done" : i === reached ? "current" : "";
    }
    $("stop-button").disabled = !s.active;
    renderFigures();
  }

  function renderFigures() {
    const s = state.supply;
    if (!s) return;
    const live = s.phase === "supplying" || s.phase === "ended";
    $("supply-kw").textContent = live ? EV.kw(s.kw) : "–";
    $("supply-kwh").textContent = live ? EV.kwh(s.kwh) : "–";
    $("supply-eur").textContent = live ? EV.euro(s.amount_eur) : "–";
    $("supply-kwh").dataset.value = String(s.kwh || 0);
    $("supply-eur").dataset.value = String(s.amount_eur || 0);
    renderElapsed();
    drawChart();
  }

  function renderElapsed() {
    const s = state.supply;
    if (!s) return;
    let text = "–";
    if (s.started_at) text = EV.duration((s.active ? nowServer() : s.ended_at || nowServer()) - s.started_at);
    else if (s.active) text = `waiting ${EV.duration(nowServer() - s.since)}`;
    $("supply-elapsed").textContent = text;
  }

  function drawChart() {
    const s = state.supply;
    const canvas = $("supply-chart");
    if (!s || canvas.clientWidth === 0) return;
    // Small supplies read better in Wh than in a flat line near 0 kWh.
    const top = s.points.reduce((m, [, v]) => Math.max(m, v), 0);
    const [factor, unit] = top < 1 ? [1000, "· Wh"] : [1, "· kWh"];
    const points = s.points.map(([t, v]) => [t - state.offset, v * factor]);
    const first = s.points.length ? s.points[0][0] : nowServer();
    const span = Math.max(10, Math.ceil(nowServer() - first) + 1);
    EV.drawChart(canvas, [{ label: "energy", colour: "#2458d6", points }], { span, unit });
  }

  $("stop-button").addEventListener("click", () => {
    if (send({ type: "stop" })) {
      $("stop-button").disabled = true;
      note("stop requested");
    }
  });

  // --- tickets, balance, history -----------------------------------------------------------

  function onTicket(msg) {
    const t = msg.ticket;
    const label = msg.kind === "away" ? "while you were away" : msg.kind === "correction" ? `corrected (revision ${t.revision})` : "";
    const rows = [
      ["Charging point", t.cp_id],
      ["Energy", EV.kwh(t.kwh)],
      ["Price", `${Number(t.price_eur_kwh).toFixed(2)} €/kWh`],
      ["Amount", EV.euro(t.amount_eur)],
      ["Ended because", reasonText(t.reason)],
      ["Started", t.started_at ? new Date(t.started_at * 1000).toLocaleString() : "–"],
      ["Ended", new Date(t.ended_at * 1000).toLocaleString()],
      ["Duration", t.started_at ? EV.duration(t.ended_at - t.started_at) : "–"],
    ];
    const box = $("ticket");
    box.dataset.session = t.session_id;
    box.dataset.kwh = String(t.kwh);
    box.dataset.amount = String(t.amount_eur);
    EV.replace(box,
      EV.el("div", { class: "ticket-amount" }, EV.euro(t.amount_eur)),
      label ? EV.el("div", { class: "ticket-kind" }, label) : null,
      EV.el("dl", {}, ...rows.flatMap(([k, v]) => [EV.el("dt", {}, k), EV.el("dd", {}, v)])));
    note(`ticket ${t.cp_id}: ${EV.kwh(t.kwh)}, ${EV.euro(t.amount_eur)} (${reasonText(t.reason)})${label ? " — " + label : ""}`);
  }

  function renderBalance(eur) {
    if (eur === null || eur === undefined) return;
    const text = EV.euro(eur);
    $("balance").textContent = text;
    $("balance").dataset.cents = String(cents(eur));
    $("balance-chip").textContent = text;
    $("balance-chip").hidden = false;
  }

  function renderHistory(tickets) {
    const rows = tickets.map((t) => EV.el("tr", { dataset: { session: t.session_id, cp: t.cp_id } },
      EV.el("td", {}, new Date(t.ended_at * 1000).toLocaleString()),
      EV.el("td", {}, t.cp_id),
      EV.el("td", { class: "num" }, Number(t.kwh).toFixed(3)),
      EV.el("td", { class: "num" }, Number(t.price_eur_kwh).toFixed(2)),
      EV.el("td", { class: "num" }, EV.euro(t.amount_eur)),
      EV.el("td", {}, reasonText(t.reason))));
    EV.replace($("history").tBodies[0], rows);
    $("history-empty").hidden = tickets.length > 0;
  }

  $("refresh").addEventListener("click", () => send({ type: "refresh" }));

  // --- the file of requests ----------------------------------------------------------------

  $("run-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = $("run-file").files[0];
    if (!file) { note("choose a file first", "error", true); return; }
    if (file.size > MAX_MESSAGE) { note("the file is larger than 64 KiB", "error", true); return; }
    const text = await file.text();
    const message = { type: "run_file", name: file.name.slice(0, 200), text };
    if (new TextEncoder().encode(JSON.stringify(message)).length > MAX_MESSAGE) {
      note("the file is too large to send (64 KiB at most)", "error", true);
      return;
    }
    if (send(message)) note(`running ${file.name}…`);
  });

  $("run-cancel").addEventListener("click", () => send({ type: "cancel_run" }));

  function renderRun() {
    const run = state.run;
    const running = Boolean(run && run.state === "running");
    $("run-cancel").disabled = !running;
    $("run-start").disabled = running;
    if (!run) {
      $("run-status").textContent = "";
      EV.replace($("run-queue"));
      EV.replace($("run-problems"));
      refreshTiles();
      return;
    }
    const done = run.items.filter((i) => ["ticket", "denied", "error", "cancelled"].includes(i.status)).length;
    renderRunStatus();
    EV.replace($("run-queue"), run.items.map((item, index) => EV.el("li", {
      class: `run-item status-${item.status}`, dataset: {
        index: String(index), cp: item.cp_id, status: item.status,
        ...(item.sent_at ? { sentAt: String(item.sent_at) } : {}),
        ...(item.done_at ? { doneAt: String(item.done_at) } : {}),
      },
    },
    EV.el("span", { class: "run-cp" }, item.cp_id),
    EV.el("span", { class: `pill run-${item.status}` }, RUN_STATUS[item.status] || item.status),
    EV.el("span", { class: "run-detail" },
      item.amount_eur != null && item.status === "ticket" ? `${EV.kwh(item.kwh)} · ${EV.euro(item.amount_eur)}` : reasonText(item.detail.split(":")[0])))));
    $("run-queue").dataset.done = String(done);
    EV.replace($("run-problems"), (run.problems || []).map((p) => EV.el("li", {}, p)));
    refreshTiles();
  }

  function renderRunStatus() {
    const run = state.run;
    if (!run) return;
    const done = run.items.filter((i) => ["ticket", "denied", "error", "cancelled"].includes(i.status)).length;
    let text = `${run.name}: ${done} of ${run.items.length} done`;
    if (run.state === "running" && run.next_at) text += ` · next request in ${Math.max(0, Math.ceil(run.next_at - nowServer()))} s`;
    if (run.state === "done") text += " · finished";
    if (run.state === "cancelled") text += " · cancelled";
    $("run-status").textContent = text;
  }

  // --- notes: the activity log and a short-lived toast ----------------------------------------

  let toastTimer = null;
  function note(text, level = "info", toast = false) {
    const log = $("activity");
    log.prepend(EV.el("div", { class: level === "error" ? "error" : "" },
      EV.el("time", {}, new Date().toLocaleTimeString()), " ", text));
    while (log.childElementCount > 200) log.lastElementChild.remove();
    if (toast || level === "error") {
      const box = $("toast");
      box.textContent = text;
      box.className = `toast ${level}`;
      box.hidden = false;
      clearTimeout(toastTimer);
      toastTimer = setTimeout(() => { box.hidden = true; }, 5000);
    }
  }

  setInterval(() => {
    if (state.supply && state.supply.active) { renderElapsed(); drawChart(); }
    if (state.run && state.run.state === "running") renderRunStatus();
  }, 1000);
  window.addEventListener("resize", drawChart);

  (async () => {
    let who = null;
    try { who = await EVAuth.whoami(); } catch { who = null; }
    if (who) enter();
    else showLogin("");
  })();
})();
