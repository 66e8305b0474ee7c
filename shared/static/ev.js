// Shared by the three dashboards: a WebSocket that reconnects by itself, and DOM helpers
// that insert data as text, never as HTML.
"use strict";

const EV = (() => {
  // el("div", {class: "tile", dataset: {cp: "CP001"}}, "text", child) -> element.
  // Strings become text nodes; there is no way to pass HTML through here.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function replace(node, ...children) {
    node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false)
      .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  }

  const euro = (v) => (Number(v) || 0).toFixed(2) + " €";
  const kwh = (v) => (Number(v) || 0).toFixed(4) + " kWh";
  const kw = (v) => (Number(v) || 0).toFixed(2) + " kW";
  const time = (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString() : "–");
  const duration = (s) => {
    s = Math.max(0, Math.round(s));
    const m = Math.floor(s / 60);
    return m ? `${m} min ${s % 60} s` : `${s} s`;
  };
  // A CP whose engine runs a simulated clock (--speed N) is marked wherever its figures show,
  // so that nobody takes them for real time: "×60 simulated time"; null at real time.
  const simulated = (speed) => {
    const n = Number(speed);
    if (!Number.isFinite(n) || n <= 0 || n === 1) return null;
    return `×${Number(n.toPrecision(4))} simulated time`;
  };

  // A WebSocket to this page's own server at `path`, reconnecting with backoff. The element
  // #connection shows online/offline; #reconnecting is shown while the link is down.
  // options.onDrop(event), when given, is awaited after each drop: false stops reconnecting
  // (a page whose login ended asks for a new one instead). close() stops it for good.
  function connect(path, onMessage, onOpen, options = {}) {
    let socket = null;
    let delay = 500;
    let stopped = false;
    const status = document.getElementById("connection");
    const banner = document.getElementById("reconnecting");
    function setOnline(online) {
      if (status) {
        status.textContent = online ? "live" : "reconnecting…";
        status.className = online ? "online" : "offline";
      }
      if (banner) banner.classList.toggle("show", !online);
    }
    function open() {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      socket = new WebSocket(`${scheme}//${location.host}${path}`);
      socket.addEventListener("open", () => {
        delay = 500;
        setOnline(true);
        if (onOpen) onOpen(send);
      });
      socket.addEventListener("message", (event) => {
        let message;
        try { message = JSON.parse(event.data); } catch { return; }
        onMessage(message, send);
      });
      socket.addEventListener("close", async (event) => {
        if (stopped) return;
        setOnline(false);
        if (options.onDrop) {
          let again = true;
          try { again = await options.onDrop(event); } catch { again = true; }
          if (!again || stopped) { stop(); return; }
        }
        setTimeout(open, delay);
        delay = Math.min(delay * 2, 5000);
      });
    }
    function stop() {
      stopped = true;
      if (status) { status.textContent = "signed out"; status.className = "offline"; }
      if (banner) banner.classList.remove("show");
      if (socket && socket.readyState <= WebSocket.OPEN) socket.close();
    }
    function send(message) {
      if (socket && socket.readyState === WebSocket.OPEN) {
        socket.send(JSON.stringify(message));
        return true;
      }
      return false;
    }
    setOnline(false);
    open();
    return { send, close: stop };
  }

  // A small line chart on a <canvas>: series = [{label, colour, points: [[t, v], ...]}].
  function drawChart(canvas, series, { span = 120, unit = "" } = {}) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (canvas.width !== width * ratio) { canvas.width = width * ratio; canvas.height = height * ratio; }
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const now = Date.now() / 1000;
    let max = 1;
    for (const s of series) for (const [, v] of s.points) max = Math.max(max, v);
    max *= 1.15;
    g.strokeStyle = "#dde0e5"; g.fillStyle = "#5d6470"; g.font = "11px system-ui"; g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = 8 + (height - 24) * (1 - i / 4);
      g.beginPath(); g.moveTo(36, y); g.lineTo(width - 4, y); g.stroke();
      g.fillText((max * i / 4).toFixed(max < 10 ? 1 : 0), 2, y + 4);
    }
    g.fillText(`last ${span} s ${unit}`, 40, height - 4);
    series.forEach((s) => {
      g.strokeStyle = s.colour; g.lineWidth = 2; g.beginPath();
      let started = false;
      for (const [t, v] of s.points) {
        if (now - t > span) continue;
        const x = 36 + (width - 40) * (1 - (now - t) / span);
        const y = 8 + (height - 24) * (1 - v / max);
        if (started) g.lineTo(x, y); else { g.moveTo(x, y); started = true; }
      }
      g.stroke();
    });
  }

  return { el, replace, euro, kwh, kw, time, duration, simulated, connect, drawChart };
})();
