// Logging in on the dashboards (docs/web-auth.md). The password goes over a WebSocket on
// /login; the one-time grant it answers becomes the session cookie through GET /session
// (HttpOnly, SameSite=Strict: no script, this one included, ever sees the session token);
// the page's own /ws then opens with that cookie.
"use strict";

const EVAuth = (() => {
  const fetchOptions = { credentials: "same-origin", cache: "no-store" };

  // Who is logged in here ({user, role, expires_in}), or null; throws when unreachable.
  async function whoami() {
    const answer = await fetch("/api/whoami", fetchOptions);
    if (answer.status === 401) return null;
    if (!answer.ok) throw new Error(`the server answered ${answer.status}`);
    return answer.json();
  }

  function askLogin(user, password) {
    return new Promise((resolve) => {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      let socket;
      let done = false;
      const finish = (answer) => {
        if (done) return;
        done = true;
        resolve(answer);
        if (socket.readyState <= WebSocket.OPEN) socket.close();
      };
      try {
        socket = new WebSocket(`${scheme}//${location.host}/login`);
      } catch {
        resolve({ ok: false, reason: "cannot reach the server; try again" });
        return;
      }
      socket.addEventListener("open", () => socket.send(JSON.stringify({ type: "login", user, password })));
      socket.addEventListener("message", (event) => {
        let message = null;
        try { message = JSON.parse(event.data); } catch { message = null; }
        finish(message && message.type === "login_result"
          ? message : { ok: false, reason: "unexpected answer from the server" });
      });
      socket.addEventListener("close", () => finish({ ok: false, reason: "cannot reach the server; try again" }));
    });
  }

  // Log in: {ok: true, user, role} with the cookie set, or {ok: false, reason, retry_after}.
  async function login(user, password) {
    const answer = await askLogin(user, password);
    if (!answer.ok) return answer;
    try {
      const session = await fetch(`/session?grant=${encodeURIComponent(answer.grant)}`, fetchOptions);
      if (session.status !== 204) return { ok: false, reason: "the server did not open the session; try again" };
    } catch {
      return { ok: false, reason: "cannot reach the server; try again" };
    }
    return { ok: true, user: answer.user, role: answer.role };
  }

  async function logout() {
    try { await fetch("/logout", fetchOptions); } catch { /* unreachable: the cookie expires anyway */ }
  }

  // Wire a login form. parts: {form, user, password, submit, error, onLogin({user, role})}.
  // Every message is shown with textContent; a blocked login counts down its "retry in N s".
  function bindForm(parts) {
    let timer = null;
    const show = (text) => { parts.error.textContent = text; };
    function countdown(reason, seconds) {
      const base = String(reason || "too many failed logins").replace(/[,;]?\s*try again in \d+ s\.?/, "");
      const until = Date.now() + seconds * 1000;
      const tick = () => {
        const left = Math.ceil((until - Date.now()) / 1000);
        if (left <= 0) {
          clearInterval(timer);
          show(`${base}: you may try again now`);
        } else {
          show(`${base} (retry in ${left} s)`);
        }
      };
      clearInterval(timer);
      tick();
      timer = setInterval(tick, 1000);
    }
    parts.form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const user = parts.user.value.trim();
      const password = parts.password.value;
      if (!user || !password) return;
      clearInterval(timer);
      show("");
      parts.submit.disabled = true;
      try {
        const answer = await login(user, password);
        if (answer.ok) {
          parts.password.value = "";
          parts.onLogin({ user: answer.user, role: answer.role });
        } else if (answer.retry_after) {
          countdown(answer.reason, Number(answer.retry_after));
        } else {
          show(answer.reason || "login refused");
        }
      } finally {
        parts.submit.disabled = false;
      }
    });
    return {
      show(text) { clearInterval(timer); show(text); },
    };
  }

  return { whoami, login, logout, bindForm };
})();
