// rollguard web view. Plain JavaScript, no framework: the page is built
// with DOM calls and textContent only (host names, paths and reasons come
// from hosts and operators, and are never parsed as HTML). Changes arrive
// as server-sent events from `rollguard ui`; nothing reloads the page.
"use strict";

const state = { agents: null, rollouts: null, kill: null, rollout: null };
let source = null;      // the EventSource
let sourceFor = null;   // the rollout id it follows, or ""
let page = null;        // { name, id, refresh }

// ---- small DOM helpers --------------------------------------------------

// Text from hosts and operators, shown as it is: control characters and
// bidirectional overrides (which could make a path read differently) are
// written out as \u{...}.
function clean(text) {
  return String(text).replace(/[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g,
    (c) => "\\u{" + c.charCodeAt(0).toString(16) + "}");
}

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = clean(v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(clean(c)));
  }
  return el;
}

function $(id) { return document.getElementById(id); }

function badge(word) {
  const w = String(word || "unknown");
  return h("span", { class: "badge st-" + w.replace(/[^a-z_]/g, "") }, w.toUpperCase().replace(/_/g, " "));
}

function when(t) {
  if (!t) return "—";
  const d = new Date(t);
  return isNaN(d) ? t : d.toLocaleString();
}

function table(caption, headers, rows) {
  return h("table", {},
    h("caption", { class: "visually-hidden" }, caption),
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
    h("tbody", {}, rows));
}

// ---- talking to rollguard ui --------------------------------------------

// The session secret. The link's first use answers with the page carrying
// it (`<meta name="rollguard-session">`); the page keeps it in localStorage
// (per origin, port included: other tabs of this page share it; a later
// `rollguard ui` makes a new one) and sends it in a header, never in a
// cookie: browsers send cookies for 127.0.0.1 to every port, hence to any
// other local web server.
const SESSION_KEY = "rollguard-session";
let session = null;

function signIn() {
  // The spent token out of the address bar, first of all.
  if (location.search) history.replaceState(null, "", "/" + (location.hash || "#/fleet"));
  const meta = document.querySelector('meta[name="rollguard-session"]');
  const fresh = meta && meta.content;
  if (meta) meta.remove();
  // Storage may be refused (a browser setting): this tab still works.
  try {
    if (fresh) localStorage.setItem(SESSION_KEY, fresh);
    session = fresh || localStorage.getItem(SESSION_KEY);
  } catch (_) {
    session = fresh || null;
  }
}

async function get(path) {
  const r = await fetch(path, { headers: { "X-Rollguard-Session": session || "" } });
  const data = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

async function post(path, body) {
  const r = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Rollguard-Session": session || "" },
    body: JSON.stringify(body),
  });
  const text = await r.text();
  let data;
  try { data = JSON.parse(text); } catch (_) { data = { error: text }; }
  if (!r.ok) throw new Error((data && data.error) || r.statusText);
  return data;
}

let retry = null;       // the timer of the next reconnection

function follow(rolloutId) {
  const want = rolloutId || "";
  if (source && source.readyState !== EventSource.CLOSED && sourceFor === want) return;
  if (source) source.close();
  if (sourceFor !== want) {
    state.rollout = null;
    state.rollout_error = null;
  }
  sourceFor = want;
  // A hidden tab holds no connection: browsers allow six per server, and
  // the kill button of the visible tab needs one.
  if (document.hidden) { source = null; return; }
  const query = new URLSearchParams({ session: session || "" });
  if (want) query.set("rollout", want);
  source = new EventSource("/api/events?" + query);
  for (const name of ["agents", "rollouts", "kill", "rollout", "rollout_error"]) {
    source.addEventListener(name, (e) => {
      state[name] = JSON.parse(e.data);
      if (name === "rollout") state.rollout_error = null;
      if (name === "kill") showKill();
      if (page) page.refresh();
    });
  }
  source.addEventListener("health", (e) => {
    const hl = JSON.parse(e.data);
    setStale(!hl.ok, hl.ok ? "Live" : "CONTROLLER UNREACHABLE: " + clean(hl.error) + " (what is shown may be out of date)");
  });
  source.onerror = () => {
    setStale(true, "DISCONNECTED from rollguard ui: what is shown may be out of date; reconnecting…");
    // The browser retries by itself unless the answer was an error; then
    // it gives up, and so would the page without this.
    if (source && source.readyState === EventSource.CLOSED && !retry) {
      retry = setTimeout(async () => {
        retry = null;
        try {
          await get("/api/kill");
        } catch (e) {
          if (/not signed in/i.test(e.message)) { signedOut(e.message); return; }
        }
        follow(sourceFor);
      }, 2000);
    }
  };
}

function setStale(stale, text) {
  const el = $("health");
  el.textContent = text;
  el.classList.toggle("bad", stale);
  $("main").classList.toggle("stale", stale);
}

function signedOut(why) {
  if (source) source.close();
  source = null;
  $("health").textContent = "Not signed in";
  $("main").replaceChildren(h("p", { role: "alert", id: "signin-error" }, "Not signed in: " + why));
}

// ---- the kill switch, on every page ------------------------------------

function showKill() {
  const k = state.kill;
  const banner = $("kill-banner");
  banner.replaceChildren();
  if (!k || (!k.all && (!k.rollouts || k.rollouts.length === 0))) {
    banner.hidden = true;
    return;
  }
  banner.hidden = false;
  if (k.all) {
    banner.append(h("p", {}, "KILL SWITCH ENGAGED for every rollout: " + k.all.reason +
      " (by " + k.all.by + ", " + when(k.all.at) + "). Hosts refuse new runs until it is lifted (rollguard kill --lift)."));
  }
  for (const r of k.rollouts || []) {
    banner.append(h("p", {}, "KILLED: rollout " + r.rollout_id + ": " + r.reason + " (by " + r.by + ", " + when(r.at) + ")."));
  }
}

// What a kill achieved, and whether all of it. Marked as a problem when the
// CLI would fail (an agent did not acknowledge, a replica did not answer)
// and also when no agent was connected to receive it, which the CLI only
// reports.
function killResult(answer) {
  const pending = answer.agents_pending || [];
  const missing = answer.agents_sent - answer.agents_acked;
  const complete = missing === 0 && !answer.replicas_silent;
  const lines = [
    "Kill in force. Acknowledged by " + answer.agents_acked + " of " + answer.agents_sent +
      " connected agents (their covered bundles are dead).",
  ];
  if (missing > 0) {
    const more = missing - pending.length;
    lines.push("NOT ACKNOWLEDGED in time by " + missing + ": " + pending.join(", ") + (more > 0 ? " and " + more + " more" : "") + ".");
  }
  if (answer.replicas_silent) lines.push("INCOMPLETE: " + answer.replicas_silent + " controller replica(s) did not answer: their agents are not counted.");
  if (complete && answer.agents_sent > 0) lines.push("Every connected agent acknowledged.");
  if (answer.agents_sent === 0) lines.push("No agent was connected to receive it.");
  if (answer.halted_rollouts && answer.halted_rollouts.length) lines.push("Halted: " + answer.halted_rollouts.join(", ") + ".");
  return { text: lines.join(" "), bad: !complete || answer.agents_sent === 0 };
}

function showResult(text, bad) {
  const el = $("action-result");
  el.textContent = text;
  el.classList.toggle("bad", !!bad);
  el.hidden = false;
}

// One confirmation dialog for every action: what it does, and why.
function confirmAction(title, text, label, run) {
  const dlg = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = label;
  $("confirm-error").textContent = "";
  const reason = $("confirm-reason");
  reason.value = "";
  const form = $("confirm-form");
  const ok = $("confirm-ok");
  const cancel = $("confirm-cancel");
  let busy = false;
  ok.disabled = false;
  cancel.disabled = false;
  // While the request is out, the dialog stays: its outcome must be seen.
  dlg.oncancel = (e) => { if (busy) e.preventDefault(); };
  form.onsubmit = async (e) => {
    e.preventDefault();
    const why = reason.value.trim();
    if (!why) {
      $("confirm-error").textContent = "A reason is required.";
      reason.focus();
      return;
    }
    busy = true;
    ok.disabled = true;
    cancel.disabled = true;
    $("confirm-error").textContent = "Sending…";
    try {
      const out = await run(why);
      dlg.close();
      showResult(out.text, out.bad);
    } catch (err) {
      const unknown = /OUTCOME UNKNOWN/.test(err.message);
      const text = (unknown ? "" : "Refused: ") + clean(err.message);
      $("confirm-error").textContent = text;
      showResult(title + ": " + text, true);
      // An unknown outcome is not to be sent again blindly: check first.
      ok.disabled = unknown;
    } finally {
      busy = false;
      cancel.disabled = false;
    }
  };
  cancel.onclick = () => dlg.close();
  dlg.showModal();
  reason.focus();
}

function killAll() {
  confirmAction("Kill every rollout",
    "Every running bundle on every host is killed, every running rollout halts, and hosts refuse new runs until the kill is lifted.",
    "Kill everything",
    async (reason) => killResult(await post("/api/kill", { scope: "all", reason })));
}

// ---- pages ---------------------------------------------------------------

function fleetPage(main) {
  const input = h("input", { id: "fleet-filter", type: "search", "aria-label": "Filter by name or label", placeholder: "name or label=value" });
  const count = h("p", { id: "fleet-count", class: "muted", "aria-live": "polite" });
  const holder = h("div", { id: "fleet-table" });
  input.addEventListener("input", () => refresh());
  main.append(h("h1", {}, "Fleet"), h("p", { class: "filter" }, input), count, holder);
  function refresh() {
    const agents = state.agents;
    if (!agents) { holder.replaceChildren(h("p", {}, "Loading…")); return; }
    const q = input.value.trim().toLowerCase();
    const shown = agents.filter((a) => !q || a.name.toLowerCase().includes(q) ||
      Object.entries(a.labels || {}).some(([k, v]) => (k + "=" + v).toLowerCase().includes(q)));
    const connected = agents.filter((a) => a.connected).length;
    count.textContent = shown.length + " of " + agents.length + " hosts shown; " + connected + " connected.";
    holder.replaceChildren(table("Hosts", ["Host", "State", "Labels", "Last seen", "Agent version", "Kernel", "Landlock", "Controller"],
      shown.map((a) => h("tr", {},
        h("td", { class: "mono" }, a.name),
        h("td", {}, badge(a.connected ? "connected" : "offline")),
        h("td", {}, Object.entries(a.labels || {}).map(([k, v]) => k + "=" + v).join(", ") || "—"),
        h("td", {}, when(a.last_seen)),
        h("td", {}, a.agent_version || "—"),
        h("td", {}, a.kernel || "—"),
        h("td", {}, a.landlock_abi == null ? "—" : "ABI " + a.landlock_abi),
        h("td", {}, a.controller || "—")))));
  }
  return refresh;
}

function rolloutsPage(main) {
  const holder = h("div", { id: "rollouts-table" });
  main.append(h("h1", {}, "Rollouts"), holder);
  return () => {
    const list = state.rollouts;
    if (!list) { holder.replaceChildren(h("p", {}, "Loading…")); return; }
    if (!list.length) { holder.replaceChildren(h("p", {}, "No rollouts yet.")); return; }
    const sorted = [...list].sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
    // Summaries (GET /v1/rollouts?summary=true): hosts counted by state.
    const counts = (r) => Object.entries(r.host_states || {}).map(([k, n]) => n + " " + k.replace(/_/g, " ")).join(", ");
    holder.replaceChildren(table("Rollouts", ["Rollout", "Bundle", "State", "Wave", "Hosts", "Denied", "Started", "Halt reason"],
      sorted.map((r) => h("tr", {},
        h("td", {}, h("a", { href: "#/rollouts/" + r.id, class: "mono" }, r.id)),
        h("td", {}, r.bundle.name + " v" + r.bundle.version + (r.preview ? " (preview)" : "")),
        h("td", {}, badge(r.state)),
        h("td", {}, Math.min(r.current_wave + 1, r.wave_count) + " of " + r.wave_count),
        h("td", {}, r.hosts + (r.hosts ? " (" + counts(r) + ")" : "")),
        h("td", {}, r.denials ? h("span", { class: "badge st-denied" }, r.denials + " DENIED") : "none"),
        h("td", {}, when(r.created_at)),
        h("td", {}, r.halt_reason || "—")))));
  };
}

const FINISHED = (s) => s !== "pending" && s !== "dispatched";
const BAD = new Set(["failed", "timed_out", "killed", "interrupted", "refused"]);

function denialsOf(run) {
  const rep = run.report;
  if (!rep) return null;
  return rep.denials;  // null: the host could not observe them (unknown)
}

// Denials the kernel counted: may exceed those listed (rate-limited records).
function deniedCount(run) {
  const d = denialsOf(run);
  if (!d) return 0;
  return Math.max(d.length, run.report.denial_count || 0);
}

function rolloutPage(main, id) {
  const title = h("h1", {}, "Rollout " + id);
  const stateLine = h("p", { class: "state-line", id: "rollout-state-line" });
  const halt = h("div", { id: "halt-reason", class: "halt", role: "alert", hidden: true });
  const haltBtn = h("button", { type: "button", id: "halt", hidden: true }, "Halt…");
  const resumeBtn = h("button", { type: "button", id: "resume", hidden: true }, "Resume…");
  const killBtn = h("button", { type: "button", id: "kill-rollout", class: "danger" }, "Kill this rollout…");
  const bundleLink = h("a", { id: "bundle-link", hidden: true }, "Bundle: blast radius");
  const waves = h("section", { id: "waves", "aria-label": "Waves" });
  const denials = h("section", { id: "denials", "aria-label": "Denied accesses" });
  const hosts = h("section", { id: "hosts", "aria-label": "Hosts" });
  haltBtn.addEventListener("click", () => confirmAction("Halt rollout " + id,
    "No new host receives the bundle; runs in progress finish.", "Halt",
    async (reason) => { const s = await post("/api/rollouts/" + encodeURIComponent(id) + "/halt", { reason }); return { text: "Rollout " + id + " is " + s.state.toUpperCase() + ".", bad: false }; }));
  resumeBtn.addEventListener("click", () => confirmAction("Resume rollout " + id,
    "The rollout continues with its next hosts; the failures and alarms so far are acknowledged.", "Resume",
    async (reason) => { const s = await post("/api/rollouts/" + encodeURIComponent(id) + "/resume", { reason }); return { text: "Rollout " + id + " is " + s.state.toUpperCase() + ".", bad: false }; }));
  killBtn.addEventListener("click", () => confirmAction("Kill rollout " + id,
    "Its running bundles are killed on every host, it halts, and hosts refuse to run it until the kill is lifted.", "Kill rollout",
    async (reason) => killResult(await post("/api/kill", { scope: { rollout: id }, reason }))));
  main.append(title, stateLine, halt, h("div", { class: "actions" }, haltBtn, resumeBtn, killBtn, bundleLink),
    h("h2", {}, "Waves"), waves, h("h2", {}, "Denied accesses"), denials, h("h2", {}, "Hosts"), hosts);
  return () => {
    const r = state.rollout;
    if (state.rollout_error) { stateLine.replaceChildren(h("strong", { role: "alert" }, "Cannot show rollout " + id + ": " + state.rollout_error.error)); return; }
    if (!r || r.id !== id) { stateLine.replaceChildren("Loading…"); return; }
    title.textContent = "Rollout " + r.id + ": " + r.plan.bundle.name + " v" + r.plan.bundle.version + (r.plan.preview ? " (preview)" : "");
    const phase = r.state === "running" ? " (" + r.phase + ", wave " + Math.min(r.current_wave + 1, r.wave_count) + " of " + r.wave_count + ")" : "";
    stateLine.replaceChildren("State: ", h("strong", { id: "rollout-state", class: "badge st-" + r.state }, r.state.toUpperCase()), phase);
    halt.hidden = !r.halt_reason;
    halt.textContent = r.halt_reason ? "HALTED: " + clean(r.halt_reason) : "";
    haltBtn.hidden = r.state !== "running";
    resumeBtn.hidden = r.state !== "halted";
    bundleLink.hidden = false;
    bundleLink.href = "#/bundles/" + r.plan.bundle.sha256;

    const byWave = r.plan.waves.map(() => []);
    for (const run of r.hosts) (byWave[run.wave] || (byWave[run.wave] = [])).push(run);
    waves.replaceChildren(...byWave.map((runs, i) => {
      const done = runs.filter((x) => FINISHED(x.state)).length;
      const bad = runs.some((x) => BAD.has(x.state) || deniedCount(x) > 0);
      const current = r.state === "running" && i === r.current_wave;
      const label = "Wave " + (i + 1) + ": " + done + " of " + runs.length + " hosts reported" +
        (current ? " (current)" : "") + (bad ? ", PROBLEMS" : "");
      const pct = runs.length ? Math.round((100 * done) / runs.length) : 100;
      return h("div", { class: "wave" },
        h("p", { id: "wave-" + (i + 1) + "-label" }, label),
        h("div", { class: "bar" + (bad ? " bad" : done === runs.length ? " ok" : ""), role: "progressbar",
          "aria-labelledby": "wave-" + (i + 1) + "-label", "aria-valuemin": 0, "aria-valuemax": runs.length, "aria-valuenow": done },
          h("span", {})));
    }));
    // Widths are set through the DOM (the page's policy forbids inline style attributes).
    waves.querySelectorAll(".bar").forEach((bar) => {
      const max = Number(bar.getAttribute("aria-valuemax"));
      const now = Number(bar.getAttribute("aria-valuenow"));
      bar.firstChild.style.width = (max ? (100 * now) / max : 100) + "%";
    });

    const list = [];
    const unknown = [];
    for (const run of r.hosts) {
      const d = denialsOf(run);
      if (run.report && d === null) unknown.push(run.host);
      for (const x of d || []) list.push(h("li", {}, h("span", { class: "mono" }, run.host), ": ",
        h("strong", {}, "DENIED "), x.access + " ", h("code", {}, x.path || "(no path)"), x.exe ? " by " + x.exe : ""));
    }
    const parts = [];
    if (list.length) parts.push(h("ul", { class: "denials" }, list));
    else parts.push(h("p", {}, "None reported."));
    if (unknown.length) parts.push(h("p", {}, "UNKNOWN on " + unknown.join(", ") + ": those hosts could not observe denials."));
    denials.replaceChildren(...parts);

    hosts.replaceChildren(table("Hosts of this rollout", ["Host", "Wave", "State", "Exit", "Denied", "Details"],
      r.hosts.map((run) => {
        const rep = run.report;
        const d = denialsOf(run);
        return h("tr", {},
          h("td", { class: "mono" }, run.host),
          h("td", {}, String(run.wave + 1)),
          h("td", {}, badge(run.state)),
          h("td", {}, rep && rep.exit_code != null ? String(rep.exit_code) : "—"),
          h("td", {}, !rep ? "—" : d === null ? badge("unknown") : deniedCount(run) ? h("span", { class: "badge st-denied" },
            deniedCount(run) + " DENIED" + (deniedCount(run) > d.length ? " (" + d.length + " listed)" : "")) : "none"),
          h("td", {}, rep ? (rep.reason || (rep.limits_hit || []).join(", ") || "") : ""));
      })));
  };
}

function value(v) {
  if (v === null || v === undefined) return "—";
  if (Array.isArray(v)) return v.length ? v.map((x) => (typeof x === "object" ? JSON.stringify(x) : String(x))).join(", ") : "(none)";
  if (typeof v === "object") return Object.keys(v).length ? h("dl", { class: "kv" }, Object.entries(v).map(([k, x]) => [h("dt", {}, k), h("dd", {}, value(x))])) : "(none)";
  return String(v);
}

function bundlePage(main, sha) {
  const body = h("div", { id: "bundle" }, "Loading…");
  main.append(h("h1", {}, "Bundle"), body);
  get("/api/bundles/" + encodeURIComponent(sha)).then((b) => {
    const sigs = (b.signatures || []).map((s) => h("li", {},
      (s.claimed_signer || "(no principal)") + " — " + (s.key_algorithm || "?") + " " + (s.key_fingerprint || "")));
    body.replaceChildren(
      h("dl", { class: "kv" },
        h("dt", {}, "Name"), h("dd", {}, b.name + " v" + b.version),
        h("dt", {}, "Description"), h("dd", {}, b.description || "—"),
        h("dt", {}, "Expires"), h("dd", {}, b.expires + (b.expired ? " (EXPIRED)" : "")),
        h("dt", {}, "Manifest"), h("dd", { class: "mono" }, "sha256:" + b.manifest_sha256)),
      h("h2", {}, "Where it runs (targets)"), value(b.targets),
      h("h2", {}, "What it may change (scope)"),
      h("p", { class: "muted" }, "Everything else is read-only; host-protected paths are always off limits."), value(b.scope),
      b.services ? [h("h2", {}, "Services"), value(b.services)] : null,
      b.packages ? [h("h2", {}, "Packages"), value(b.packages)] : null,
      h("h2", {}, "Signers (" + sigs.length + ")"),
      h("p", { class: "muted" }, "As the bundle names them; each host verifies them against its own allowed signers."),
      sigs.length ? h("ul", {}, sigs) : h("p", {}, "(none)"),
      h("h2", {}, "Warnings"),
      (b.warnings || []).length ? h("ul", { class: "warnings" }, b.warnings.map((w) => h("li", {}, "WARNING: " + w))) : h("p", {}, "None."));
  }).catch((e) => body.replaceChildren(h("p", { role: "alert" }, "Could not load the bundle: " + e.message)));
  return () => {};
}

// ---- routing -------------------------------------------------------------

function route() {
  const parts = (location.hash.replace(/^#\/?/, "") || "fleet").split("/");
  const main = $("main");
  main.replaceChildren();
  let refresh;
  if (parts[0] === "rollouts" && parts[1] && !/^[a-z0-9][a-z0-9-]{0,63}$/.test(parts[1])) {
    main.append(h("p", { role: "alert" }, "Not a rollout id."));
    page = { refresh: () => {} };
    return;
  } else if (parts[0] === "rollouts" && parts[1]) {
    follow(parts[1]);
    refresh = rolloutPage(main, parts[1]);
  } else if (parts[0] === "rollouts") {
    follow(sourceFor);
    refresh = rolloutsPage(main);
  } else if (parts[0] === "bundles" && parts[1]) {
    follow(sourceFor);
    refresh = bundlePage(main, parts[1]);
  } else {
    follow(sourceFor);
    refresh = fleetPage(main);
  }
  for (const [id, name] of [["nav-fleet", "fleet"], ["nav-rollouts", "rollouts"]]) {
    if (parts[0] === name) $(id).setAttribute("aria-current", "page");
    else $(id).removeAttribute("aria-current");
  }
  page = { refresh };
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  signIn();
  if (!session) {
    $("health").textContent = "Not signed in";
    $("main").replaceChildren(h("p", { role: "alert", id: "signin-error" },
      "Not signed in: open the link `rollguard ui` printed (it works once, in one browser)."));
    return;
  }
  $("kill-all").addEventListener("click", killAll);
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      if (source) source.close();
      source = null;
    } else {
      follow(sourceFor);
    }
  });
  route();
});
