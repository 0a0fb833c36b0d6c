// The API Keys console. It speaks only to the admin API on its own origin, with the admin
// token held in sessionStorage (never a cookie, a URL or a log). No library, no build step.

const TOKEN = "keygate.admin_token";
// Whether this tab got past sign-in with the token it holds.
let signedIn = false;
const $ = (id) => document.getElementById(id);
const PAGE = 50;
const ACTIONS = [
  "key.created", "key.revoked", "key.disabled", "key.enabled", "key.regenerated", "key.rotated",
  "key.updated", "key.imported", "key.credits_set", "key.leaked", "auth.failed", "auth.locked_out", "config.reloaded",
  "config.reload_failed", "alert.fired", "alert.resolved", "alert.created", "alert.updated",
  "alert.deleted", "identity.created", "identity.updated", "identity.deleted",
];
// The most credits a key or an identity may hold (README, "Keys").
const MAX_CREDITS = 1e12;
// The largest `meta`, in bytes of compact JSON.
const MAX_META_BYTES = 4096;

/** A refusal from the admin API, carrying its problem+json. */
class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `The gateway answered ${status}.`);
    this.status = status;
    this.problem = problem || {};
  }
}

async function api(method, path, body) {
  const headers = { authorization: `Bearer ${sessionStorage.getItem(TOKEN) || ""}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  let res;
  try {
    res = await fetch(path, {
      method, headers, cache: "no-store", credentials: "omit",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, { detail: "The gateway could not be reached." });
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (res.status === 401) {
    signOut(signedIn
      ? "The admin token was refused: it may have been revoked or changed. Sign in again."
      : "That admin token was refused. Check it and try again.");
    throw new ApiError(401, data);
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

// ---- formatting -------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c != null) node.append(c);
  return node;
}

function exact(iso) {
  return iso ? new Date(iso).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC") : "";
}

function relative(iso) {
  if (!iso) return "never";
  const secs = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  const future = secs < 0;
  const s = Math.abs(secs);
  const [n, unit] = s < 45 ? [0, ""] : s < 3600 ? [Math.round(s / 60), "minute"]
    : s < 86400 ? [Math.round(s / 3600), "hour"] : [Math.round(s / 86400), "day"];
  if (!unit) return future ? "in a moment" : "just now";
  const words = `${n} ${unit}${n === 1 ? "" : "s"}`;
  return future ? `in ${words}` : `${words} ago`;
}

function time(iso) {
  return iso ? el("time", { datetime: iso, title: exact(iso), text: relative(iso) }) : "never";
}

const STATUS_LABEL = { active: "Active", inactive: "Inactive", expired: "Expired", revoked: "Revoked" };
const badge = (status) => el("span", { class: `badge ${status}`, text: STATUS_LABEL[status] || status });
const percent = (rate) => `${(100 * (rate || 0)).toFixed(rate && rate < 0.01 ? 2 : 1)}%`;
// An error rate over no requests is not 0 %: there is nothing to rate.
const errorRate = (rate, requests) => (requests ? percent(rate) : "—");
const plural = (n, one, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;
// A key as people name it: its name and id, or its id.
const who = (k) => (k.name ? `“${k.name}” (${k.id})` : k.id);

/** A server message for a person: `quoted` names in curly quotes, a capital, a full stop. */
function humanize(text) {
  const t = String(text || "").replace(/`([^`]*)`/g, "“$1”").trim();
  if (!t) return "The gateway refused the change.";
  return `${t[0].toUpperCase()}${t.slice(1)}${/[.!?]$/.test(t) ? "" : "."}`;
}
const count = (n) => Number(n).toLocaleString("en");
const scopeChips = (scopes) => scopes?.length
  ? scopes.map((s) => el("span", { class: "chip", text: s }))
  : [el("span", { class: "muted", text: "full access" })];

/** A link to an identity's view. */
function identityLink(id) {
  return el("a", { href: `?${new URLSearchParams({ view: "identity", id })}`, class: "identity",
    onclick: (e) => { e.preventDefault(); go({ view: "identity", id }); } }, el("code", { text: id }));
}

/** When a refill comes, in words. */
function refillText(r) {
  return r.interval === "monthly"
    ? `refills to ${count(r.amount)} on day ${r.day_of_month || 1} of each month`
    : `refills to ${count(r.amount)} each day at 00:00 UTC`;
}

/** Credits as a fact: what is left, the refill and the next one; "none" without credits. */
function creditsFact(c) {
  if (!c) return "none";
  return el("span", { class: "credits-fact" }, `${count(c.remaining)} left; `,
    c.refill ? refillText(c.refill) : "no refill",
    ...(c.next_refill ? ["; next refill ", time(c.next_refill)] : []));
}

/** A metadata value as text: a string as it is, anything else as its JSON. */
const metaText = (v) => (typeof v === "string" ? v : JSON.stringify(v));

/** `meta`'s members as "name: value" lines. Text nodes only: a value is never markup. */
function metaList(meta) {
  const entries = Object.entries(meta || {});
  if (!entries.length) return "none";
  return el("ul", { class: "meta" }, ...entries.map(([name, v]) => el("li", {},
    el("span", { class: "meta-name", text: name }), ": ", el("span", { class: "meta-value", text: metaText(v) }))));
}

/** `meta` in one short line, for a table cell. */
function metaLine(meta) {
  const text = Object.entries(meta || {}).map(([n, v]) => `${n}: ${metaText(v)}`).join(", ");
  return text.length > 60 ? `${text.slice(0, 60)}…` : text;
}

function flash(message, bad = false) {
  const f = $("flash");
  f.textContent = message;
  f.classList.toggle("bad", bad);
  f.hidden = !message;
}

// ---- the URL holds the view -------------------------------------------------------------

function params() {
  return new URLSearchParams(location.search);
}

/** Moves to another view. A message about what was just done stays only if `keep`. */
function go(changes, push = true, keep = false) {
  if (!keep) flash("");
  const p = params();
  for (const [k, v] of Object.entries(changes)) {
    if (v === undefined || v === null || v === "") p.delete(k); else p.set(k, v);
  }
  const url = `${location.pathname}?${p}`;
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
  render();
}

// ---- sign in and out --------------------------------------------------------------------

function signOut(message) {
  signedIn = false;
  sessionStorage.removeItem(TOKEN);
  $("app").hidden = true;
  $("signin").hidden = false;
  for (const d of document.querySelectorAll("dialog[open]")) d.close();
  $("secret-value").value = "";
  const err = $("signin-error");
  err.textContent = message || "";
  err.hidden = !message;
  $("token").value = "";
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) {
    $("signin-error").textContent = "Enter an admin token.";
    $("signin-error").hidden = false;
    return;
  }
  sessionStorage.setItem(TOKEN, token);
  $("token").value = "";
  try {
    await start();
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) signOut(e.message);
  }
}

let namespaces = [];
// The environments new keys may name: those the routes serve and those the config declares.
let environments = [];

async function start() {
  const data = await api("GET", "/v1/namespaces");
  signedIn = true;
  namespaces = data.namespaces || [];
  environments = data.environments || [];
  $("signin").hidden = true;
  $("app").hidden = false;
  await render();
}

function currentNamespace() {
  const wanted = params().get("ns");
  if (wanted) return wanted;
  return namespaces[0]?.name || "default";
}

function renderNamespaces() {
  const picker = $("namespace");
  const ns = currentNamespace();
  const names = namespaces.map((n) => n.name);
  if (!names.includes(ns)) names.push(ns);
  picker.replaceChildren(...names.map((n) => el("option", { value: n, text: n, selected: n === ns })));
  const info = namespaces.find((n) => n.name === ns);
  const used = info?.keys_in_use ?? 0;
  const tier = info?.tier ? `, ${info.tier[0].toUpperCase()}${info.tier.slice(1)}` : "";
  $("ns-usage").textContent = info?.max_keys != null
    ? `${used} of ${plural(info.max_keys, "key")}${tier}`
    : `${plural(used, "key")}${tier}`;
  // At the tier's cap, creating is refused: say so before anyone fills in the form.
  const full = info?.max_keys != null && used >= info.max_keys;
  for (const b of [$("create"), $("empty-create")]) b.disabled = full;
  $("cap").hidden = !full;
  if (full) {
    $("cap-text").textContent = `${ns} has ${used} of the ${plural(info.max_keys, "key")} its ${info.tier} tier allows, so no key can be created. Revoke a key it no longer uses to make room.`;
    $("cap-link").href = `?${new URLSearchParams({ ns, view: "keys" })}`;
  }
}

async function refreshNamespaces() {
  const data = await api("GET", "/v1/namespaces");
  namespaces = data.namespaces || [];
  environments = data.environments || [];
  renderNamespaces();
}

// ---- views ------------------------------------------------------------------------------

async function render() {
  if (!sessionStorage.getItem(TOKEN)) return signOut();
  const view = params().get("view") || "keys";
  renderNamespaces();
  for (const v of ["keys", "key", "identities", "identity", "usage", "alerts", "audit"]) $(`view-${v}`).hidden = v !== view;
  const here = ["audit", "usage", "alerts", "identities"].includes(view) ? `nav-${view}`
    : view === "identity" ? "nav-identities" : "nav-keys";
  for (const nav of ["nav-keys", "nav-identities", "nav-usage", "nav-alerts", "nav-audit"]) {
    if (nav === here) $(nav).setAttribute("aria-current", "page"); else $(nav).removeAttribute("aria-current");
  }
  try {
    if (view === "key") await renderKey(params().get("id"));
    else if (view === "audit") await renderAudit();
    else if (view === "usage") await renderUsage();
    else if (view === "alerts") await renderAlerts();
    else if (view === "identities") await renderIdentities();
    else if (view === "identity") await renderIdentity(params().get("id"));
    else await renderKeys();
  } catch (e) {
    if (e.status !== 401) flash(e.message, true);
  }
}

let cursor = null;

async function renderKeys(append = false) {
  const p = params();
  const status = p.get("status") || "active";
  const search = p.get("q") || "";
  $("status").value = status;
  if (document.activeElement !== $("search")) $("search").value = search;
  const query = new URLSearchParams({ namespace: currentNamespace(), status, limit: PAGE });
  if (search) query.set("search", search);
  if (append && cursor) query.set("cursor", cursor);
  const data = await api("GET", `/v1/api-keys?${query}`);
  cursor = data.next_cursor;
  if (!append) listed.clear();
  for (const k of data.keys) listed.set(k.id, k);
  const rows = data.keys.map(keyRow);
  if (append) $("keys-body").append(...rows); else $("keys-body").replaceChildren(...rows);
  const none = $("keys-body").children.length === 0;
  $("keys-table").parentElement.hidden = none;
  $("empty").hidden = !none;
  const filtered = Boolean(search) || status !== "active";
  $("empty-text").textContent = search
    ? `No keys in ${currentNamespace()} match “${search}”.`
    : status !== "active"
      ? `No ${status === "all" ? "" : `${status} `}keys in ${currentNamespace()}.`
      : `No active API keys in ${currentNamespace()} yet.`;
  // A search or filter that finds nothing offers to undo itself, not to create a key.
  $("empty-create").hidden = filtered;
  $("empty-clear").hidden = !filtered;
  $("empty-clear").textContent = search ? "Clear search" : "Show active keys";
  $("more").hidden = !cursor;
}

// The keys listed so far, by id: a row being rotated out names its successor.
const listed = new Map();

/** Where a leaked key was found: a link when it is a web address, else the text. */
function leakSource(k) {
  const url = k.leak_url || "";
  return /^https?:\/\//i.test(url)
    ? el("a", { href: url, rel: "noopener noreferrer", target: "_blank", text: url })
    : el("span", { text: url || "no source given" });
}

/** The "Leaked" mark: when it was found and where. */
function leakedMark(k) {
  return [el("span", { class: "badge leaked", text: "Leaked", title: `reported ${k.leaked_at}` }),
    el("span", { class: "sub" }, "found at ", leakSource(k))];
}

/** The status cell: a leaked key says so first; a rotation's old key is "Rotating out" until
 * it expires, with its successor. */
function statusCell(k) {
  if (k.leaked_at) return [badge(k.status), ...leakedMark(k)];
  const link = (id) => el("a", { href: `?view=key&id=${encodeURIComponent(id)}`,
    onclick: (e) => { e.preventDefault(); go({ view: "key", id }); } }, el("code", { text: id }));
  if (k.rotated_to && (k.status === "active" || k.status === "inactive")) {
    return [el("span", { class: "badge rotating", text: "Rotating out" }),
      el("span", { class: "sub" }, `expires ${relative(k.expires_at)}, replaced by `, link(k.rotated_to))];
  }
  const old = k.rotated_from && listed.get(k.rotated_from);
  if (old && old.rotated_to === k.id && (old.status === "active" || old.status === "inactive")) {
    return [badge(k.status), el("span", { class: "sub" }, "replaces ", link(old.id))];
  }
  return [badge(k.status)];
}

/** The row's menu: the actions that change a key, destructive ones last and in red. */
function rowMenu(k) {
  if (k.status === "revoked") return "";
  const menu = el("details", { class: "menu" });
  const item = (text, action, cls) => el("button", { type: "button", role: "menuitem", class: cls, text,
    onclick: () => { menu.open = false; if (action === "credits") openTopUp(k); else confirmAction(action, k); } });
  menu.append(
    el("summary", { "aria-label": `Actions for ${k.name || k.id}`, text: "⋮" }),
    el("div", { class: "items", role: "menu" },
      k.status === "active" ? item("Disable…", "disable") : null,
      k.status === "inactive" ? item("Enable…", "enable") : null,
      k.credits ? item("Top up credits…", "credits") : null,
      item("Revoke…", "revoke", "danger-text")));
  return menu;
}

/** A key's rate limits: the short form, then each named limit by its name. */
function limitParts(k) {
  const burst = (b) => (b ? `, burst ${b}` : "");
  return [
    ...(k.rate_limit ? [`${k.rate_limit}${burst(k.burst)}`] : []),
    ...(k.rate_limits || []).map((l) => `${l.name}: ${l.limit}${burst(l.burst)}`),
  ];
}

/** A key's rate limits in a line. */
const limitsText = (k) => limitParts(k).join("; ");

/** A key's rate limits, one line a limit (so that a table column stays narrow); `none`
 * without any. */
function limitLines(k, none = "—") {
  const parts = limitParts(k);
  return parts.length > 1 ? parts.map((p) => el("span", { class: "line", text: p })) : parts[0] || none;
}

function keyRow(k) {
  const open = () => go({ view: "key", id: k.id });
  const cell = (label, content, cls) => el("td", { "data-label": label, class: cls }, content);
  const note = k.note || "";
  return el("tr", { "data-key-id": k.id },
    cell("Key ID", [el("code", { text: k.id }), el("code", { class: "sub", text: `${k.prefix}…` })]),
    cell("Name", [el("a", { href: `?${new URLSearchParams({ ...Object.fromEntries(params()), view: "key", id: k.id })}`,
      text: k.name || "(unnamed)", onclick: (e) => { e.preventDefault(); open(); } }),
    k.identity ? el("span", { class: "sub identity-line", title: `identity ${k.identity}` }, "identity ", identityLink(k.identity)) : null]),
    cell("Environment", k.environment),
    cell("Scopes", scopeChips(k.scopes), "scopes"),
    cell("Rate limit", limitLines(k)),
    cell("Expires", k.expires_at ? time(k.expires_at) : "never"),
    cell("Created", time(k.created_at)),
    cell("Last used", time(k.last_used_at)),
    cell("Requests today", String(k.requests_today ?? 0), "num"),
    cell("Error rate", errorRate(k.error_rate, k.requests_today), "num"),
    cell("Status", statusCell(k)),
    el("td", { "data-label": "Note", class: "note", title: note || null, text: note.length > 60 ? `${note.slice(0, 60)}…` : note }),
    cell("Actions", rowMenu(k)),
  );
}

let shownKey = null;

/** `[term, content]` pairs as a description list's children; each `dd` names its term. */
const factList = (facts) => facts.flatMap(([dt, dd]) => [el("dt", { text: dt }), el("dd", { "data-fact": dt }, dd)]);

async function renderKey(id) {
  const [k, usage, audit, recent] = await Promise.all([
    api("GET", `/v1/api-keys/${encodeURIComponent(id)}`),
    api("GET", `/v1/api-keys/${encodeURIComponent(id)}/usage`),
    api("GET", `/v1/audit?${new URLSearchParams({ key_id: id, limit: 50 })}`),
    api("GET", `/v1/api-keys/${encodeURIComponent(id)}/requests`),
  ]);
  shownKey = k;
  $("key-title").textContent = k.name || k.id;
  $("key-status").replaceWith(Object.assign(badge(k.status), { id: "key-status" }));
  const live = k.status !== "revoked";
  const show = { edit: live, disable: k.status === "active", enable: k.status === "inactive",
    credits: live && Boolean(k.credits), rotate: live && !k.rotated_to, regenerate: live, revoke: live };
  for (const b of $("key-actions").querySelectorAll("button")) b.hidden = !show[b.dataset.action];

  const link = (other) => el("a", { href: `?view=key&id=${encodeURIComponent(other)}`,
    onclick: (e) => { e.preventDefault(); go({ view: "key", id: other }); } }, el("code", { text: other }));
  // A revoked key no longer expires: it says when it was revoked, by whom, and what replaced it.
  const revokedBy = audit.events.find((e) => e.action === "key.revoked")?.actor;
  const ending = k.status === "revoked"
    ? [["Revoked", el("span", {}, k.revoked_at ? time(k.revoked_at) : "yes", revokedBy ? ` by ${revokedBy}` : "")]]
    : [["Expires", k.expires_at ? time(k.expires_at) : "never"]];
  const facts = [
    ["Key ID", el("code", { text: k.id })], ["Prefix", el("code", { text: `${k.prefix}…` })],
    ["Namespace", k.namespace], ["Environment", k.environment], ["Scopes", scopeChips(k.scopes)],
    ["Allowed IPs", k.allowed_cidrs?.length ? k.allowed_cidrs.join(", ") : "every address"],
    ["Identity", k.identity ? identityLink(k.identity) : "none"],
    ["Rate limit", limitLines(k, "none")],
    ["Quota", k.quota || "none"], ["Credits", creditsFact(k.credits)], ...ending,
    ...(k.rotated_to ? [["Replaced by", link(k.rotated_to)]] : []),
    ...(k.rotated_from ? [["Replaces", link(k.rotated_from)]] : []),
    ...(k.leaked_at ? [["Leaked", el("span", {}, ...leakedMark(k), ` ${time(k.leaked_at)}`)]] : []),
    ["Created", el("span", {}, time(k.created_at), k.created_by ? ` by ${k.created_by}` : "")],
    ["Last used", el("span", {}, time(usage.last_used_at), usage.last_used_ip ? ` from ${usage.last_used_ip}` : "")],
    ["Requests today", String(usage.requests_today)], ["Error rate", errorRate(usage.error_rate, usage.requests_today)],
    ["Note", k.note || "—"], ["Metadata", metaList(k.meta)],
  ];
  $("key-facts").replaceChildren(...factList(facts));
  $("chart").replaceChildren(...chart(usage.series || []));
  const codes = Object.entries(usage.by_code_today || {}).filter(([code]) => !/^\d/.test(code) || code >= "400");
  $("refusals").replaceChildren(...(codes.length
    ? codes.map(([code, n]) => el("li", {}, el("code", { text: code }), ` ${n}`))
    : [el("li", { class: "muted", text: "none" })]));
  $("key-audit").replaceChildren(...auditRows(audit.events, false));
  $("key-requests").replaceChildren(...requestRows(recent.requests.slice(0, 100)));
  renderExposure(k, recent.requests);
  await renderRotation(k);
}

function requestRows(requests) {
  if (!requests.length) return [el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No requests kept." }))];
  return requests.map((r) => el("tr", {},
    el("td", {}, exact(r.time)), el("td", { text: r.ip }), el("td", { text: r.method }),
    el("td", {}, el("code", { text: r.path })), el("td", { text: String(r.status) }),
    el("td", {}, r.code ? el("code", { text: r.code }) : "")));
}

/**
 * After a leak report or a revocation: who used the key, from where, between its first
 * possible exposure (its creation: a leak is found after it began) and its revocation, and
 * how many of those came after the report.
 */
function renderExposure(k, requests) {
  const box = $("exposure");
  box.hidden = !(k.leaked_at || k.status === "revoked");
  if (box.hidden) return;
  const end = k.revoked_at ? new Date(k.revoked_at).getTime() + 999 : Infinity;
  const inside = requests.filter((r) => new Date(r.time).getTime() <= end);
  const attempts = requests.length - inside.length;
  const reported = k.leaked_at ? new Date(k.leaked_at).getTime() : null;
  const sinceReport = reported === null ? 0 : inside.filter((r) => new Date(r.time).getTime() >= reported).length;
  const byIp = new Map();
  for (const r of inside) byIp.set(r.ip, (byIp.get(r.ip) || 0) + 1);
  const plural = (n, word, many = `${word}s`) => `${n} ${n === 1 ? word : many}`;
  box.replaceChildren(
    el("h3", { text: "Requests between first exposure and revocation" }),
    el("p", {}, `From ${exact(k.created_at)} (created) until `,
      k.revoked_at ? `${exact(k.revoked_at)} (revoked)` : "now (not revoked)",
      `: ${plural(inside.length, "request")} from ${plural(byIp.size, "address", "addresses")}`,
      k.leaked_at ? `, ${sinceReport} of them after the leak report (${exact(k.leaked_at)})` : "",
      attempts ? `; ${plural(attempts, "refused attempt")} since the revocation.` : "."),
    el("ul", { class: "codes", id: "exposure-addresses" },
      ...[...byIp].sort((a, b) => b[1] - a[1]).map(([ip, n]) =>
        el("li", { "data-ip": ip }, el("code", { text: ip }), ` ${n}`))),
  );
}

async function renderRotation(k) {
  const box = $("rotation");
  box.hidden = true;
  const other = k.rotated_to || k.rotated_from;
  if (!other || k.status === "revoked") return;
  const old = k.rotated_to ? k : await api("GET", `/v1/api-keys/${encodeURIComponent(k.rotated_from)}`).catch(() => null);
  if (!old || old.status === "revoked") return;
  const link = (id) => el("a", { href: `?view=key&id=${encodeURIComponent(id)}`,
    onclick: (e) => { e.preventDefault(); go({ view: "key", id }); } }, el("code", { text: id }));
  const safe = old.safe_to_revoke;
  box.replaceChildren(
    el("p", {}, "Rotation: ", link(old.id), " is being replaced by ", link(old.rotated_to),
      `. The old key works until ${exact(old.expires_at)}.`),
    el("p", {}, "Old key last used: ", time(old.last_used_at), old.last_used_ip ? ` from ${old.last_used_ip}` : "", ". ",
      el("strong", { text: safe ? "Safe to revoke: nothing has used it recently." : "Not yet safe to revoke: it is still in use." })),
    safe ? el("button", { type: "button", class: "danger", text: "Revoke the old key",
      onclick: () => confirmAction("revoke", old) }) : "",
  );
  box.hidden = false;
}

/** Per-minute requests for the last 24 hours as an inline SVG: accepted below, refused on top. */
function chart(series) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    return n;
  };
  const W = 1440, H = 160, nowMin = Math.floor(Date.now() / 60000), start = nowMin - 1439;
  const points = series.map((m) => ({ at: Math.floor(new Date(m.minute).getTime() / 60000), a: m.accepted, r: m.refused }))
    .filter((m) => m.at >= start && m.at <= nowMin);
  const accepted = points.reduce((s, m) => s + m.a, 0), refused = points.reduce((s, m) => s + m.r, 0);
  if (!points.length) return [el("p", { class: "nothing", text: "No requests in the last 24 hours." })];
  const peak = Math.max(1, ...points.map((m) => m.a + m.r));
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
    "data-accepted": accepted, "data-refused": refused,
    "aria-label": `${accepted} accepted and ${refused} refused requests in the last 24 hours; busiest minute ${peak === 1 && !points.length ? 0 : peak}` });
  root.append(svg("line", { class: "axis", x1: 0, x2: W, y1: H, y2: H }));
  for (const m of points) {
    const x = m.at - start, ha = (m.a / peak) * H, hr = (m.r / peak) * H;
    const width = 3;
    if (m.a) root.append(svg("rect", { class: "accepted", x: x - width + 1, y: H - ha, width, height: ha }));
    if (m.r) root.append(svg("rect", { class: "refused", x: x - width + 1, y: H - ha - hr, width, height: hr }));
  }
  // Labels are HTML: the drawing stretches to the width, which would distort SVG text.
  const axis = el("div", { class: "axis-labels" },
    el("span", { text: "24 h ago" }), el("span", { text: "12 h ago" }), el("span", { text: "now" }));
  const peakLabel = el("p", { class: "legend", text: `Busiest minute: ${points.length ? peak : 0} requests` });
  return [peakLabel, root, axis];
}

// What an event says beyond its action: why it failed, what changed, what it replaced.
function auditDetail(e) {
  const parts = [];
  if (e.rotated_from) parts.push(`replaces ${e.rotated_from}`);
  if (e.reason || e.detail) parts.push(e.reason || e.detail);
  return parts.join("; ");
}

function auditRows(events, withKey) {
  if (!events?.length) return [el("tr", {}, el("td", { colspan: withKey ? 7 : 6, class: "muted", text: "No events." }))];
  return events.map((e) => el("tr", {},
    el("td", {}, time(e.time)), el("td", {}, el("code", { text: e.action })), el("td", { text: e.actor || "" }),
    withKey ? el("td", {}, e.key_id ? el("code", { text: e.key_id }) : "") : null,
    el("td", { text: e.ip || "" }), el("td", { text: e.outcome || "" }),
    el("td", { class: "scopes", text: auditDetail(e) })));
}

/** Today's usage over every namespace: totals, the chart, namespaces, codes and top keys. */
async function renderUsage() {
  const u = await api("GET", "/v1/usage?top=10");
  const t = u.totals;
  $("usage-date").textContent = u.date;
  const tile = (n, what) => el("div", { class: "tile" }, el("span", { class: "n", text: n }), el("span", { class: "what", text: what }));
  $("usage-tiles").replaceChildren(
    tile(String(t.requests_today), "requests"), tile(String(t.accepted_today), "accepted"),
    tile(String(t.refused_today), "refused"), tile(errorRate(t.error_rate, t.requests_today), "error rate"),
    tile(String(t.keys_used_today), "keys used"));
  $("usage-chart").replaceChildren(...chart(u.series || []));
  const none = (cols, text) => [el("tr", {}, el("td", { colspan: cols, class: "muted", text }))];
  const num = (n) => el("td", { class: "num", text: String(n) });
  const keyLink = (k) => el("td", {}, el("a", {
    href: `?${new URLSearchParams({ ns: k.namespace, view: "key", id: k.key_id })}`,
    onclick: (e) => { e.preventDefault(); go({ ns: k.namespace, view: "key", id: k.key_id }); },
  }, el("code", { text: k.key_id })));
  $("usage-namespaces").replaceChildren(...(u.namespaces.length ? u.namespaces.map((n) => el("tr", {},
    el("td", { text: n.namespace }), num(n.requests_today), num(n.refused_today),
    el("td", { class: "num", text: errorRate(n.error_rate, n.requests_today) }), num(n.keys_used_today)))
    : none(5, "No requests today.")));
  const codes = [
    ...Object.entries(u.by_code_today || {}),
    ...Object.entries(u.unidentified_refusals_today || {}),
  ].sort((a, b) => b[1] - a[1]);
  $("usage-codes").replaceChildren(...(codes.length
    ? codes.map(([code, n]) => el("tr", {}, el("td", {}, el("code", { text: code })), num(n)))
    : none(2, "No refusals today.")));
  const keyRows = (list, empty) => (list.length ? list.map((k) => el("tr", {}, keyLink(k),
    el("td", { text: k.namespace }), num(k.requests_today),
    el("td", { class: "num", text: errorRate(k.error_rate, k.requests_today) }))) : none(4, empty));
  $("usage-top").replaceChildren(...keyRows(u.top_by_requests, "No requests today."));
  $("usage-errors").replaceChildren(...keyRows(u.top_by_error_rate, "No key with 10 or more requests had errors today."));
}

// ---- alert rules ----------------------------------------------------------------------------

let alertSetup = { webhook: false, email: false };

/** A rule's condition in words. */
function condition(r) {
  if (r.requests_per_minute != null) return `more than ${r.requests_per_minute} requests in a minute`;
  if (r.error_rate_percent != null) return `error rate over ${r.error_rate_percent}% in ${r.over || "5m"}`;
  if (r.quota_percent != null) return `${r.quota_percent}% of its quota used`;
  return "—";
}

async function renderAlerts() {
  const data = await api("GET", "/v1/alerts");
  alertSetup = { webhook: data.webhook, email: data.email };
  const ways = ["the audit log", ...(data.webhook ? ["the webhook"] : []), ...(data.email ? ["email, to each rule's addresses"] : [])];
  $("alert-delivery").textContent = `Alerts go to ${ways.join(", ")}.${data.email ? "" : " Email is not set up: add alerts.smtp to the config to email alerts."}`;
  $("alerts-body").replaceChildren(...(data.rules.length ? data.rules.map(alertRow)
    : [el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No alert rules yet." }))]));
}

function alertRow(r) {
  const scope = r.key ? el("span", {}, "key ", el("code", { text: r.key }))
    : r.namespace ? `each key of ${r.namespace}` : "every key";
  let actions = el("span", { class: "muted", text: "edit in the config" });
  if (r.source === "api") {
    const menu = el("details", { class: "menu" });
    const item = (text, onclick, cls) => el("button", { type: "button", role: "menuitem", class: cls, text,
      onclick: () => { menu.open = false; onclick(); } });
    menu.append(el("summary", { "aria-label": `Actions for ${r.name}`, text: "⋮" }),
      el("div", { class: "items", role: "menu" },
        item("Edit…", () => openAlertForm(r)),
        item("Delete…", () => confirmDeleteAlert(r), "danger-text")));
    actions = menu;
  }
  const cell = (label, content, cls) => el("td", { "data-label": label, class: cls }, content);
  return el("tr", { "data-alert": r.name },
    cell("Name", el("strong", { text: r.name })), cell("Applies to", scope), cell("Fires when", condition(r)),
    cell("Email", (r.email || []).join(", ") || "—", "scopes"),
    cell("Kept in", r.source === "api" ? "key store" : "config file"), cell("Actions", actions));
}

let editingAlert = null;

function openAlertForm(rule) {
  editingAlert = rule || null;
  $("alert-form-form").reset();
  for (const e of $("alert-form").querySelectorAll(".error, .callout")) { e.textContent = ""; e.hidden = true; }
  for (const i of $("alert-form").querySelectorAll("[aria-invalid]")) i.removeAttribute("aria-invalid");
  $("alert-form-title").textContent = rule ? `Edit ${rule.name}` : "New alert rule";
  $("alert-form-submit").textContent = rule ? "Save changes" : "Create rule";
  $("a-name").value = rule?.name || "";
  $("a-name").disabled = !!rule;
  $("a-scope").value = rule?.key ? "key" : rule?.namespace ? "namespace" : "all";
  $("a-target").value = rule?.key || rule?.namespace || "";
  const cond = ["requests_per_minute", "error_rate_percent", "quota_percent"].find((c) => rule?.[c] != null) || "requests_per_minute";
  $("a-condition").value = cond;
  $("a-threshold").value = rule?.[cond] ?? "";
  $("a-over").value = rule?.over || "5m";
  $("a-email").value = (rule?.email || []).join("\n");
  $("a-email").disabled = !alertSetup.email;
  $("a-email-hint").textContent = alertSetup.email
    ? "They get a message when the rule fires and when it resolves."
    : "Email is not set up on this gateway (alerts.smtp in the config).";
  alertFormShape();
  $("alert-form").showModal();
  (rule ? $("a-threshold") : $("a-name")).focus();
}

/** Shows the fields the chosen scope and condition need. */
function alertFormShape() {
  const scope = $("a-scope").value;
  $("a-target-field").hidden = scope === "all";
  $("a-target-label").textContent = scope === "key" ? "Key ID" : "Namespace";
  $("a-over-field").hidden = $("a-condition").value !== "error_rate_percent";
}

function alertError(field, message) {
  const box = $(`ae-${field}`) || $("ae-form");
  box.textContent = message;
  box.hidden = false;
  const input = { name: "a-name", target: "a-target", threshold: "a-threshold", email: "a-email" }[field];
  if (input && box.id !== "ae-form") $(input).setAttribute("aria-invalid", "true");
  (input && box.id !== "ae-form" ? $(input) : box).focus();
}

/** The rule the form describes, or null after showing what is wrong. */
function readAlertForm() {
  for (const e of $("alert-form").querySelectorAll(".error, .callout")) { e.textContent = ""; e.hidden = true; }
  const name = $("a-name").value.trim();
  const scope = $("a-scope").value;
  const target = $("a-target").value.trim();
  const cond = $("a-condition").value;
  const threshold = Number($("a-threshold").value.trim());
  const email = $("a-email").value.split(/[\n,]+/).map((a) => a.trim()).filter(Boolean);
  const problems = [];
  if (!editingAlert && !/^[A-Za-z0-9._-]{1,64}$/.test(name)) problems.push(["name", "Give the rule a name of letters, digits, “.”, “_” or “-”, such as hot-keys."]);
  if (scope !== "all" && !target) problems.push(["target", scope === "key" ? "Which key? Give its ID." : "Which namespace?"]);
  const percent = cond !== "requests_per_minute";
  if (!$("a-threshold").value.trim() || !Number.isFinite(threshold) || threshold < 0 || (percent && threshold > 100)
    || (!percent && !Number.isInteger(threshold))) {
    problems.push(["threshold", percent ? "A percentage, from 0 to 100." : "A whole number of requests, such as 1000."]);
  }
  for (const [field, message] of problems.reverse()) alertError(field, message);
  if (problems.length) return null;
  const rule = { name: editingAlert?.name || name, [cond]: threshold };
  if (scope === "key") rule.key = target;
  if (scope === "namespace") rule.namespace = target;
  if (cond === "error_rate_percent") rule.over = $("a-over").value;
  if (email.length) rule.email = email;
  return rule;
}

async function submitAlertForm(event) {
  event.preventDefault();
  const rule = readAlertForm();
  if (!rule) return;
  $("alert-form-submit").disabled = true;
  try {
    if (editingAlert) {
      // A merge patch: what the form leaves out is removed.
      const patch = { key: null, namespace: null, requests_per_minute: null, error_rate_percent: null, over: null,
        quota_percent: null, email: null, ...rule };
      delete patch.name;
      await api("PATCH", `/v1/alerts/${encodeURIComponent(editingAlert.name)}`, patch);
      flash(`Saved the rule ${rule.name}.`);
    } else {
      await api("POST", "/v1/alerts", rule);
      flash(`Created the rule ${rule.name}. It is in force now.`);
    }
    $("alert-form").close();
    await renderAlerts();
  } catch (e) {
    if (e.status === 401) return;
    const field = { key: "target", namespace: "target", requests_per_minute: "threshold", error_rate_percent: "threshold",
      quota_percent: "threshold", over: "threshold" }[e.problem.field] || e.problem.field;
    alertError($(`ae-${field}`) ? field : "form", humanize(e.message));
  } finally {
    $("alert-form-submit").disabled = false;
  }
}

function confirmDeleteAlert(rule) {
  $("confirm-title").textContent = `Delete the rule ${rule.name}?`;
  $("confirm-text").textContent = `The rule stops being evaluated at once; an alert of it that is firing resolves quietly. It fires when there are ${condition(rule)}.`;
  $("confirm-ok").textContent = "Delete rule";
  $("confirm-ok").className = "danger";
  $("grace-field").hidden = true;
  $("confirm-error").hidden = true;
  $("confirm").onsubmit = async (event) => {
    event.preventDefault();
    try {
      await api("DELETE", `/v1/alerts/${encodeURIComponent(rule.name)}`);
      $("confirm").close();
      flash(`Deleted the rule ${rule.name}.`);
      await renderAlerts();
    } catch (e) {
      if (e.status !== 401) { $("confirm-error").textContent = humanize(e.message); $("confirm-error").hidden = false; }
    }
  };
  $("confirm").showModal();
  $("confirm-cancel").focus();
}

async function renderAudit() {
  const p = params();
  const action = p.get("action") || "";
  const key = p.get("key") || "";
  $("audit-action").value = action;
  if (document.activeElement !== $("audit-key")) $("audit-key").value = key;
  const query = new URLSearchParams({ limit: 200 });
  if (action) query.set("action", action);
  if (key) query.set("key_id", key);
  // The range is picked in local time and asked for in UTC.
  for (const bound of ["since", "until"]) {
    const value = p.get(bound) || "";
    if (document.activeElement !== $(`audit-${bound}`)) $(`audit-${bound}`).value = value;
    const t = value ? new Date(value) : null;
    if (t && !Number.isNaN(t.getTime())) query.set(bound, t.toISOString().replace(/\.\d+Z$/, "Z"));
  }
  const data = await api("GET", `/v1/audit?${query}`);
  $("audit-body").replaceChildren(...auditRows(data.events, true));
  $("audit-empty").hidden = data.events.length > 0;
}

// ---- create and edit --------------------------------------------------------------------

let editing = null;

function scopeRow(scope = "read:*") {
  const i = scope.indexOf(":");
  const [action, resource] = i < 0 ? [scope, "*"] : [scope.slice(0, i), scope.slice(i + 1)];
  const select = el("select", {},
    ...["read", "write", "admin", "*"].map((a) => el("option", { value: a, text: a === "*" ? "* (any)" : a, selected: a === action })));
  const input = el("input", { value: resource, placeholder: "* (every resource)" });
  const row = el("div", { class: "scope" }, select, input,
    el("button", { type: "button", text: "Remove", onclick: () => { row.remove(); numberScopes(); } }));
  return row;
}

/** Labels each scope row by its place, after rows are added or removed. */
function numberScopes() {
  [...$("scopes").children].forEach((row, i) => {
    const n = i + 1;
    row.querySelector("select").setAttribute("aria-label", `Scope ${n} action`);
    row.querySelector("input").setAttribute("aria-label", `Scope ${n} resource filter`);
    row.querySelector("button").setAttribute("aria-label", `Remove scope ${n}`);
  });
}

/** A row's Remove button: a word, or a ✕ where the form is narrow (its label names the row). */
const removeButton = (onclick) => el("button", { type: "button", class: "remove", onclick },
  el("span", { class: "remove-text", text: "Remove" }));

/** A named rate limit's row: name, limit, burst and Remove. */
function limitRow(l = {}) {
  const input = (cls, value, placeholder, extra = {}) => el("input", { class: cls, value: value ?? "", placeholder,
    autocomplete: "off", spellcheck: "false", "data-field": "rate_limits", ...extra });
  const row = el("div", { class: "limit" },
    input("l-name", l.name, "e.g. hourly", { maxlength: 32 }),
    input("l-limit", l.limit, "e.g. 1000/h"),
    input("l-burst", l.burst, "auto", { inputmode: "numeric" }),
    removeButton(() => removeRow(row)));
  return row;
}

/** A metadata member's row: name, value and Remove. A value that is not a string is shown
 * as its JSON and kept as it was unless it is changed. */
function metaRow(name = "", value = "") {
  const text = metaText(value);
  const row = el("div", { class: "meta-row" },
    el("input", { class: "m-name", value: name, placeholder: "name, e.g. plan", autocomplete: "off", spellcheck: "false", "data-field": "meta" }),
    el("input", { class: "m-value", value: text, placeholder: "value, e.g. pro", autocomplete: "off", "data-field": "meta" }),
    removeButton(() => removeRow(row)));
  row.original = { text, value };
  return row;
}

/** Removes a list row, moving the focus to a neighbour (or the list's Add button). */
function removeRow(row) {
  const list = row.parentElement;
  const next = row.nextElementSibling || row.previousElementSibling;
  row.remove();
  numberRows(list);
  (next?.querySelector("input") || list.parentElement.querySelector("button.add"))?.focus();
}

const ROW_LABELS = {
  limit: ["Limit", ["name", "rate", "burst"], "limit"],
  "meta-row": ["Metadata", ["name", "value"], "metadata member"],
};

/** Labels each row of a list by its place, after rows are added or removed; shows the
 * column heads only when there are rows. */
function numberRows(list) {
  [...list.children].forEach((row, i) => {
    const [what, parts, removing] = ROW_LABELS[row.className];
    row.querySelectorAll("input").forEach((input, j) => input.setAttribute("aria-label", `${what} ${i + 1} ${parts[j]}`));
    row.querySelector("button").setAttribute("aria-label", `Remove ${removing} ${i + 1}`);
  });
  const head = list.previousElementSibling;
  if (head?.classList.contains("rows-head")) head.hidden = list.children.length === 0;
}

/** Adds an empty row to `list` and puts the focus in it. */
function addRow(list, make) {
  const row = make();
  list.append(row);
  numberRows(list);
  row.querySelector("input").focus();
}

/** Fills a credits fieldset (`f` in the key form, `i` in the identity form). */
function fillCredits(p, c) {
  $(`${p}-credits`).value = c ? String(c.remaining) : "";
  $(`${p}-refill`).value = c?.refill ? String(c.refill.amount) : "";
  $(`${p}-interval`).value = c?.refill?.interval || "daily";
  $(`${p}-day`).value = c?.refill?.day_of_month ?? "";
  creditsShape(p);
}

/** The day of the month goes with a monthly refill only. */
function creditsShape(p) {
  $(`${p}-day-field`).hidden = $(`${p}-interval`).value !== "monthly";
}

const whole = (text, min, max = MAX_CREDITS) => /^\d+$/.test(text) && Number(text) >= min && Number(text) <= max;

/** The credits a fieldset describes (null when blank), pushing what is wrong to `problems`
 * as `[field, message, input]`. */
function readCredits(p, problems) {
  const value = (id) => $(`${p}-${id}`).value.trim();
  const [remaining, refill, day] = [value("credits"), value("refill"), value("day")];
  if (!remaining && !refill) return null;
  if (!remaining) {
    problems.push(["credits", "Give the credits to start with; the refill then sets them back to its amount each period.", $(`${p}-credits`)]);
    return null;
  }
  if (!whole(remaining, 0)) problems.push(["credits", `Credits are a whole number from 0 to ${count(MAX_CREDITS)}.`, $(`${p}-credits`)]);
  const credits = { remaining: Number(remaining) };
  if (refill) {
    if (!whole(refill, 1)) problems.push(["credits", `A refill is a whole number of credits from 1 to ${count(MAX_CREDITS)}.`, $(`${p}-refill`)]);
    credits.refill = { amount: Number(refill), interval: $(`${p}-interval`).value };
    if (credits.refill.interval === "monthly" && day) {
      if (!whole(day, 1, 31)) problems.push(["credits", "The day of the month is 1 to 31; a shorter month refills on its last day.", $(`${p}-day`)]);
      credits.refill.day_of_month = Number(day);
    }
  } else if (day && $(`${p}-interval`).value === "monthly") {
    problems.push(["credits", "A day of the month needs a refill amount as well.", $(`${p}-refill`)]);
  }
  return credits;
}

/** The named limits of a list of rows, as the API takes them. */
function readLimits(list, problems) {
  const limits = [];
  const seen = new Set();
  for (const row of list.children) {
    const [name, limit, burst] = [...row.querySelectorAll("input")].map((i) => i.value.trim());
    const [nameInput, limitInput, burstInput] = row.querySelectorAll("input");
    if (!name && !limit && !burst) continue;
    if (!/^[a-z0-9_-]{1,32}$/.test(name)) {
      problems.push(["rate_limits", name
        ? `“${name}” is not a limit name: 1 to 32 of a-z, 0-9, “_” and “-”.`
        : "Give each limit a name, such as hourly.", nameInput]);
    } else if (name === "key" || name === "quota") {
      problems.push(["rate_limits", `“${name}” names the rate limit or the quota in the RateLimit headers: choose another name.`, nameInput]);
    } else if (seen.has(name)) {
      problems.push(["rate_limits", `“${name}” is named twice.`, nameInput]);
    }
    seen.add(name);
    if (!/^\d+\s*\/\s*[a-z]+$/i.test(limit)) problems.push(["rate_limits", `Write the limit of “${name || "the limit"}” as a count per unit, such as 1000/h.`, limitInput]);
    if (burst && !whole(burst, 1, 1e6)) problems.push(["rate_limits", "A burst is a whole number from 1 to 1,000,000.", burstInput]);
    limits.push({ name, limit: limit.replace(/\s+/g, ""), ...(burst ? { burst: Number(burst) } : {}) });
  }
  return limits;
}

/** The metadata of a list of rows, as the API takes it (null when there is none). */
function readMeta(list, problems) {
  const meta = {};
  for (const row of list.children) {
    const [nameInput, valueInput] = row.querySelectorAll("input");
    const name = nameInput.value.trim();
    const text = valueInput.value;
    if (!name && !text.trim()) continue;
    if (!name) { problems.push(["meta", "Give each member a name, such as plan.", nameInput]); continue; }
    if (Object.hasOwn(meta, name)) problems.push(["meta", `“${name}” is named twice.`, nameInput]);
    meta[name] = row.original && text === row.original.text ? row.original.value : text;
  }
  if (!Object.keys(meta).length) return null;
  const size = new TextEncoder().encode(JSON.stringify(meta)).length;
  if (size > MAX_META_BYTES) {
    // The longest value is the likeliest one to shorten.
    const longest = [...list.querySelectorAll(".m-value")].reduce((a, b) => (b.value.length > a.value.length ? b : a));
    problems.push(["meta", `Metadata is at most ${count(MAX_META_BYTES)} bytes as JSON; this is ${count(size)}. Shorten or remove a value.`, longest]);
  }
  return meta;
}

// Named limits in one spelling, for telling whether they changed.
const sameLimits = (a, b) => JSON.stringify((a || []).map((l) => [l.name, l.limit, l.burst ?? null]))
  === JSON.stringify((b || []).map((l) => [l.name, l.limit, l.burst ?? null]));
const sameCredits = (a, b) => JSON.stringify(a && [a.remaining, a.refill?.amount, a.refill?.interval, a.refill?.day_of_month ?? null])
  === JSON.stringify(b && [b.remaining, b.refill?.amount, b.refill?.interval, b.refill?.day_of_month ?? null]);
const same = (a, b) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null);

/** The identities to offer in the key form's identity field. */
async function offerIdentities() {
  try {
    const data = await api("GET", "/v1/identities");
    $("identity-ids").replaceChildren(...(data.identities || []).map((i) => el("option", { value: i.id })));
  } catch {
    // Only a suggestion: the field takes any identity.
  }
}

function openKeyForm(key) {
  editing = key || null;
  const form = $("key-form-form");
  form.reset();
  clearErrors();
  $("key-form-title").textContent = key ? `Edit ${key.name || key.id}` : "Create API key";
  $("key-form-submit").textContent = key ? "Save changes" : "Create key";
  $("edit-warning").hidden = !key;
  $("env-field").hidden = !!key;
  $("scopes").replaceChildren(...(key?.scopes || []).map(scopeRow));
  numberScopes();
  $("limits").replaceChildren(...(key?.rate_limits || []).map(limitRow));
  numberRows($("limits"));
  $("meta").replaceChildren(...Object.entries(key?.meta || {}).map(([n, v]) => metaRow(n, v)));
  numberRows($("meta"));
  $("f-identity").value = key?.identity || "";
  fillCredits("f", key?.credits);
  $("f-credits").labels[0].textContent = key?.credits ? "Credits left" : "Credits to start with";
  $("h-credits").textContent = key?.credits
    ? "What is left now. Changing these sets the credits anew from now (to add to them, use Top up credits); blank removes them."
    : "Each request spends one. A refill sets them back to its amount at 00:00 UTC each day, or on a day of each month. Leave blank for a key not limited by use.";
  offerIdentities();
  if (key) {
    $("f-name").value = key.name || "";
    $("f-cidrs").value = (key.allowed_cidrs || []).join("\n");
    $("f-rate").value = key.rate_limit || "";
    $("f-burst").value = key.burst ?? "";
    $("f-expires").value = key.expires_at ? key.expires_at.slice(0, 16) : "";
    $("f-note").value = key.note || "";
  } else {
    const choices = environments.length ? environments : ["production"];
    $("f-environment").replaceChildren(...choices.map((e) => el("option", { value: e, text: e })));
    $("f-environment").value = choices.includes("production") ? "production" : choices[0];
  }
  cidrWarning();
  $("key-form").showModal();
  $("f-name").focus();
}

function clearErrors() {
  for (const e of $("key-form").querySelectorAll(".error, .callout")) { e.textContent = ""; e.hidden = true; }
  for (const i of $("key-form").querySelectorAll("[aria-invalid]")) i.removeAttribute("aria-invalid");
}

// Where the focus goes for a list field's problem when no row is named.
const LIST_INPUTS = { scopes: "#scopes input", rate_limits: "#limits input", meta: "#meta input" };

/** Shows `message` beside `field`'s input (or `at`, the input at fault) and moves focus
 * there; without one, at the top. */
function fieldError(field, message, at) {
  const box = $(`e-${field}`) || $("e-form");
  box.textContent = message;
  box.hidden = false;
  const input = box.id === "e-form" ? null
    : at || $("key-form").querySelector(`[name="${field}"]`) || (LIST_INPUTS[field] && $("key-form").querySelector(LIST_INPUTS[field]));
  if (input) input.setAttribute("aria-invalid", "true");
  const target = input || box;
  target.focus?.();
  target.scrollIntoView?.({ block: "nearest" });
}

/** A refusal from the API as a sentence for the person filling in the form. */
function refusalText(e) {
  const code = e.problem?.code;
  if (code === "key_limit_reached") {
    const info = namespaces.find((n) => n.name === currentNamespace());
    const max = info?.max_keys;
    return max != null
      ? `${currentNamespace()} already has the ${plural(max, "key")} its ${info.tier} tier allows. Revoke a key it no longer uses, then create this one.`
      : humanize(e.message);
  }
  if (code === "store_unavailable") return "The key store cannot be reached right now, so nothing was saved. Try again in a moment.";
  return humanize(e.message);
}

/** Why `text` is not an IPv4 or IPv6 address or CIDR range, or "" if it is one. */
function cidrProblem(text) {
  const [addr, bits, extra] = text.split("/");
  if (extra !== undefined) return `“${text}” has more than one “/”.`;
  const v4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(addr);
  let max;
  if (v4) {
    if (v4.slice(1).some((o) => Number(o) > 255)) return `“${text}”: each part of an IPv4 address is 0 to 255.`;
    max = 32;
  } else if (addr.includes(":")) {
    try { new URL(`http://[${addr}]/`); } catch { return `“${text}” is not an IPv6 address.`; }
    max = 128;
  } else {
    return `“${text}” is not an IP address or CIDR range, such as 10.0.0.0/8 or 2001:db8::/32.`;
  }
  if (bits !== undefined && !(/^\d{1,3}$/.test(bits) && Number(bits) <= max)) {
    return `“${text}”: the prefix length after “/” is 0 to ${max}.`;
  }
  return "";
}

/** Checks the CIDR box as it is typed, not only on submit. */
function checkCidrs() {
  const box = $("e-allowed_cidrs");
  const problem = $("f-cidrs").value.split(/[\s,]+/).filter(Boolean).map(cidrProblem).find(Boolean) || "";
  box.textContent = problem;
  box.hidden = !problem;
  if (problem) $("f-cidrs").setAttribute("aria-invalid", "true"); else $("f-cidrs").removeAttribute("aria-invalid");
  return problem;
}

const WILDCARDS = { "0.0.0.0/0": "every IPv4 address", "::/0": "every IPv6 address" };

function cidrWarning() {
  const lines = $("f-cidrs").value.split(/[\s,]+/).filter(Boolean);
  const wild = lines.filter((l) => WILDCARDS[l]);
  $("w-cidrs").textContent = wild.length
    ? `Warning: ${wild.map((w) => `${w} accepts ${WILDCARDS[w]}`).join("; ")}. Is that what you want?`
    : "";
  $("w-cidrs").hidden = !wild.length;
}

/** Reads the form, checking each field in place; `null` when something is wrong. */
function readForm() {
  clearErrors();
  const problems = [];
  const name = $("f-name").value.trim();
  if (!name) problems.push(["name", "Give the key a name, so it can be found and understood later."]);
  const environment = $("f-environment").value.trim();
  if (!editing && !environment) problems.push(["environment", "Choose the environment the key is for."]);
  const scopes = [];
  for (const row of $("scopes").children) {
    const action = row.querySelector("select").value;
    const resource = row.querySelector("input").value.trim() || "*";
    if (/\s/.test(resource)) problems.push(["scopes", `The resource filter “${resource}” has a space in it.`]);
    scopes.push(`${action}:${resource}`);
  }
  const cidrs = $("f-cidrs").value.split(/[\s,]+/).filter(Boolean);
  const bad = cidrs.map(cidrProblem).find(Boolean);
  if (bad) problems.push(["allowed_cidrs", bad]);
  const rate = $("f-rate").value.trim();
  if (rate && !/^\d+\s*\/\s*[a-z]+$/i.test(rate)) problems.push(["rate_limit", "Write a rate as a count per unit, such as 100/s or 6000/min."]);
  const burstText = $("f-burst").value.trim();
  const burst = burstText ? Number(burstText) : null;
  if (burstText && !(Number.isInteger(burst) && burst >= 1)) problems.push(["burst", "The burst is a whole number, at least 1."]);
  else if (burst && !rate) problems.push(["burst", "A burst needs a rate limit as well."]);
  const expiresText = $("f-expires").value;
  // The form's time is UTC, as the label says.
  const expires = expiresText ? new Date(`${expiresText}${expiresText.length === 16 ? ":00" : ""}Z`) : null;
  if (expires && (Number.isNaN(expires.getTime()))) problems.push(["expires_at", "That is not a date and time."]);
  else if (expires && expires.getTime() <= Date.now() && expiresText !== editing?.expires_at?.slice(0, 16)) problems.push(["expires_at", "The expiry must be in the future."]);
  const identity = $("f-identity").value.trim();
  if (new TextEncoder().encode(identity).length > 255) problems.push(["identity", "An identity is at most 255 bytes."]);
  const rateLimits = readLimits($("limits"), problems);
  const credits = readCredits("f", problems);
  const meta = readMeta($("meta"), problems);
  // In the form's order; shown from the last, so that each field shows its first problem
  // and the first in the form has the focus.
  const order = ["name", "environment", "identity", "scopes", "allowed_cidrs", "rate_limit", "burst", "rate_limits", "credits", "expires_at", "note", "meta"];
  problems.sort((a, b) => order.indexOf(a[0]) - order.indexOf(b[0]));
  for (const [field, message, at] of problems.reverse()) fieldError(field, message, at);
  if (problems.length) return null;
  return {
    name, environment, scopes, allowed_cidrs: cidrs, rate_limit: rate || null, burst,
    expires_at: expires ? expires.toISOString().replace(/\.\d+Z$/, "Z") : null, expires_text: expiresText,
    note: $("f-note").value.trim(), identity: identity || null, rate_limits: rateLimits, credits, meta,
  };
}

/** What an edit changes: only the settings that differ from the key's, `null` clearing. */
function keyPatch(k, v) {
  const patch = {};
  if (v.name !== (k.name || "")) patch.name = v.name;
  if (!same(v.scopes, k.scopes || [])) patch.scopes = v.scopes;
  if (!same(v.allowed_cidrs, k.allowed_cidrs || [])) patch.allowed_cidrs = v.allowed_cidrs;
  if (v.rate_limit !== (k.rate_limit || null)) patch.rate_limit = v.rate_limit;
  if (v.burst !== (k.burst ?? null)) patch.burst = v.burst;
  if (!sameLimits(v.rate_limits, k.rate_limits)) patch.rate_limits = v.rate_limits.length ? v.rate_limits : null;
  if (v.identity !== (k.identity || null)) patch.identity = v.identity;
  if (!sameCredits(v.credits, k.credits)) patch.credits = v.credits;
  if (v.expires_text !== (k.expires_at ? k.expires_at.slice(0, 16) : "")) patch.expires_at = v.expires_at;
  if (v.note !== (k.note || "")) patch.note = v.note;
  if (!same(v.meta, k.meta)) patch.meta = v.meta;
  return patch;
}

async function submitKeyForm(event) {
  event.preventDefault();
  const v = readForm();
  if (!v) return;
  const submit = $("key-form-submit");
  submit.disabled = true;
  try {
    if (editing) {
      const patch = keyPatch(editing, v);
      if (!Object.keys(patch).length) {
        $("key-form").close();
        flash(`Nothing to save: no setting of ${editing.name || editing.id} was changed.`);
        return;
      }
      const updated = await api("PATCH", `/v1/api-keys/${encodeURIComponent(editing.id)}`, patch);
      $("key-form").close();
      flash(`Saved ${updated.name || updated.id}.${warnings(updated)}`);
      await render();
    } else {
      const body = { namespace: currentNamespace(), environment: v.environment, name: v.name, scopes: v.scopes,
        allowed_cidrs: v.allowed_cidrs, note: v.note };
      if (v.rate_limit) body.rate_limit = v.rate_limit;
      if (v.burst) body.burst = v.burst;
      if (v.rate_limits.length) body.rate_limits = v.rate_limits;
      if (v.identity) body.identity = v.identity;
      if (v.credits) body.credits = v.credits;
      if (v.meta) body.meta = v.meta;
      if (v.expires_at) body.expires_at = v.expires_at;
      const created = await api("POST", "/v1/api-keys", body);
      $("key-form").close();
      await showSecret(created, `Created ${created.name}.`);
      await refreshNamespaces();
      await render();
    }
  } catch (e) {
    if (e.status === 401) return;
    const field = e.problem.field;
    fieldError(field && $(`e-${field}`) ? field : "form", refusalText(e), rowAtFault(field, e.message));
  } finally {
    submit.disabled = false;
  }
}

/** The input of a list row that a server message names (`"5/fortnight"` in a named limit),
 * if one does. */
function rowAtFault(field, message) {
  const list = { rate_limits: $("limits"), meta: $("meta") }[field];
  const named = [...String(message).matchAll(/`([^`]+)`/g)].map((m) => m[1]);
  if (!list || !named.length) return null;
  return [...list.querySelectorAll("input")].find((i) => named.includes(i.value.trim())) || null;
}

// The server's warnings, as sentences.
const warnings = (v) => (v.warnings || [])
  .map((w) => ` ${w[0].toUpperCase()}${w.slice(1)}${/[.!?]$/.test(w) ? "" : "."}`).join("");

// ---- the secret, shown once ---------------------------------------------------------------

let releaseSecret = null;

/**
 * Shows the secret in `answer.key` until the user says it has been copied, then removes it
 * from the DOM and drops every reference to it. Resolves when the dialog is closed.
 */
function showSecret(answer, message, oldKey) {
  const secret = answer.key;
  delete answer.key;
  $("secret-title").textContent = `Copy the API key for ${answer.name || answer.id}`;
  $("secret-for").textContent = `Key ID ${answer.id} · ${answer.namespace} · ${answer.environment}`;
  $("secret-value").value = secret;
  $("ack").checked = false;
  $("secret-done").disabled = true;
  $("copied").textContent = "";
  const old = $("secret-old");
  old.hidden = !oldKey;
  old.textContent = oldKey
    ? `The old key (${oldKey.id}) keeps working until ${exact(oldKey.expires_at)}. Deploy the new key, then revoke the old one once it is no longer used.`
    : "";
  $("secret").showModal();
  $("secret-value").select();
  return new Promise((resolve) => {
    releaseSecret = () => {
      $("secret-value").value = "";
      $("secret-value").defaultValue = "";
      releaseSecret = null;
      flash(`${message}${warnings(answer)} The key is no longer shown.`);
      resolve();
    };
  });
}

async function copySecret() {
  const input = $("secret-value");
  try {
    await navigator.clipboard.writeText(input.value);
    $("copied").textContent = "Copied to the clipboard.";
  } catch {
    input.select();
    const ok = document.execCommand?.("copy");
    $("copied").textContent = ok ? "Copied to the clipboard." : "Copying was blocked: select the key and copy it by hand.";
  }
}

// ---- per-key actions ----------------------------------------------------------------------

const CONFIRM = {
  revoke: (k) => [`Revoke ${k.name || k.id}?`, `Revoking ${who(k)} is permanent: clients using it get 401 on their next call. It cannot be undone.`, "Revoke key"],
  disable: (k) => [`Disable ${k.name || k.id}?`, `Clients using ${who(k)} get 401 until it is enabled again.`, "Disable key"],
  enable: (k) => [`Enable ${k.name || k.id}?`, `${who(k)} will be accepted again at once.`, "Enable key"],
  regenerate: (k) => ["Regenerate the secret?", `${who(k)} keeps its ID and settings, but the old secret stops working immediately. Clients get 401 until they have the new one.`, "Regenerate"],
  rotate: (k) => ["Rotate this key?", `A new key with the same settings is made. The old one keeps working for the grace period, so clients can move over without an outage; then it expires.`, "Rotate"],
};

function confirmAction(action, key) {
  const [title, text, ok] = CONFIRM[action](key);
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = ok;
  $("confirm-ok").className = action === "enable" || action === "rotate" ? "primary" : "danger";
  $("grace-field").hidden = action !== "rotate";
  $("confirm-error").hidden = true;
  const dialog = $("confirm");
  dialog.onsubmit = async (event) => {
    event.preventDefault();
    $("confirm-ok").disabled = true;
    try {
      await perform(action, key);
    } catch (e) {
      if (e.status !== 401) {
        $("confirm-error").textContent = humanize(e.message);
        $("confirm-error").hidden = false;
      }
    } finally {
      $("confirm-ok").disabled = false;
    }
  };
  dialog.showModal();
  $("confirm-cancel").focus();
}

async function perform(action, key) {
  const path = `/v1/api-keys/${encodeURIComponent(key.id)}`;
  if (action === "revoke") {
    const v = await api("DELETE", path);
    $("confirm").close();
    flash(`Revoked ${v.name || v.id}.${warnings(v)}`);
  } else if (action === "disable" || action === "enable") {
    const v = await api("POST", `${path}/${action}`);
    $("confirm").close();
    flash(`${action === "disable" ? "Disabled" : "Enabled"} ${v.name || v.id}.${warnings(v)}`);
  } else if (action === "regenerate") {
    const v = await api("POST", `${path}/regenerate`);
    $("confirm").close();
    await showSecret(v, `Regenerated ${v.name || v.id}.`);
  } else if (action === "rotate") {
    const v = await api("POST", `${path}/rotate`, { grace_seconds: Number($("grace").value) });
    $("confirm").close();
    await showSecret(v, `Rotated ${key.name || key.id}.`, v.previous_key);
    await refreshNamespaces();
    return go({ view: "key", id: v.id }, true, true);
  }
  await refreshNamespaces();
  await render();
}

// ---- credits ------------------------------------------------------------------------------

let toppingUp = null;

/** The "Top up credits" dialog for a key that has credits: add to what is left, or set. */
function openTopUp(k) {
  toppingUp = k;
  $("topup-form").reset();
  $("topup-title").textContent = `Top up the credits of ${k.name || k.id}`;
  const c = k.credits;
  $("topup-now").textContent = `${who(k)} has ${count(c.remaining)} left; ${c.refill ? refillText(c.refill) : "no refill"}.`;
  $("topup-error").hidden = true;
  $("topup-amount").removeAttribute("aria-invalid");
  topUpShape();
  $("topup").showModal();
  $("topup-amount").focus();
}

function topUpShape() {
  const add = $("topup-add").checked;
  $("topup-amount-label").textContent = add ? "Credits to add" : "Credits from now";
  $("topup-ok").textContent = add ? "Add credits" : "Set credits";
}

function topUpError(message) {
  $("topup-error").textContent = message;
  $("topup-error").hidden = false;
  $("topup-amount").setAttribute("aria-invalid", "true");
  $("topup-amount").focus();
}

async function submitTopUp(event) {
  event.preventDefault();
  const k = toppingUp;
  const add = $("topup-add").checked;
  const text = $("topup-amount").value.trim();
  if (!whole(text, add ? 1 : 0)) {
    return topUpError(add
      ? `Add a whole number of credits, from 1 to ${count(MAX_CREDITS)}.`
      : `Set a whole number of credits, from 0 to ${count(MAX_CREDITS)}.`);
  }
  const n = Number(text);
  $("topup-ok").disabled = true;
  try {
    const v = await api("POST", `/v1/api-keys/${encodeURIComponent(k.id)}/credits`, add ? { add: n } : { set: n });
    $("topup").close();
    flash(`${add ? `Added ${count(n)} credits to` : "Set the credits of"} ${v.name || v.id}: ${count(v.credits?.remaining ?? n)} left.${warnings(v)}`);
    await render();
  } catch (e) {
    if (e.status !== 401) topUpError(humanize(e.message));
  } finally {
    $("topup-ok").disabled = false;
  }
}

// ---- identities -----------------------------------------------------------------------------

/** An identity's named limits in a line. */
const identityLimits = (i, none = "—") => limitLines({ rate_limits: i.rate_limits }, none);

async function renderIdentities() {
  const data = await api("GET", "/v1/identities");
  const list = data.identities || [];
  $("identities-body").replaceChildren(...list.map(identityRow));
  $("identities-wrap").hidden = !list.length;
  $("identities-empty").hidden = list.length > 0;
}

function identityRow(i) {
  const menu = el("details", { class: "menu" });
  const item = (text, onclick, cls) => el("button", { type: "button", role: "menuitem", class: cls, text,
    onclick: () => { menu.open = false; onclick(); } });
  menu.append(el("summary", { "aria-label": `Actions for ${i.id}`, text: "⋮" }),
    el("div", { class: "items", role: "menu" },
      item("Edit…", () => openIdentityForm(i)),
      item("Delete…", () => confirmDeleteIdentity(i), "danger-text")));
  const cell = (label, content, cls) => el("td", { "data-label": label, class: cls }, content);
  const meta = metaLine(i.meta);
  return el("tr", { "data-identity": i.id },
    cell("Identity", identityLink(i.id)),
    cell("Rate limits", identityLimits(i)),
    cell("Quota", i.quota || "—"),
    cell("Credits left", i.credits ? count(i.credits.remaining) : "—", "num"),
    el("td", { "data-label": "Metadata", class: "meta-cell", title: meta || null, text: meta || "—" }),
    cell("Updated", time(i.updated_at || i.created_at)),
    cell("Actions", menu));
}

let shownIdentity = null;

async function renderIdentity(id) {
  shownIdentity = null;
  if (!id) return go({ view: "identities" }, false, true);
  $("identity-title").textContent = id;
  let i;
  try {
    i = await api("GET", `/v1/identities/${encodeURIComponent(id)}`);
  } catch (e) {
    if (e.status !== 404) throw e;
    // A key may name an identity that has no record: say what that means, and offer one.
    $("identity-missing-text").textContent = `No identity “${id}” is kept. Keys that name it share nothing but the name, which is still sent upstream.`;
    $("identity-missing").hidden = false;
    $("identity-body").hidden = true;
    return;
  }
  $("identity-missing").hidden = true;
  $("identity-body").hidden = false;
  shownIdentity = i;
  const usage = await api("GET", `/v1/identities/${encodeURIComponent(i.id)}/usage`).catch((e) => {
    if (e.status === 401) throw e;
    return {};
  });
  const q = usage.quota;
  const quota = i.quota
    ? el("span", {}, i.quota, q ? ` (${count(q.used)} of ${count(q.limit)} used, resets ` : "", q ? time(q.resets_at) : "", q ? ")" : "")
    : "none";
  const requests = usage.requests_today ?? 0;
  $("identity-facts").replaceChildren(...factList([
    ["Identity", el("code", { text: i.id })],
    ["Rate limits", identityLimits(i, "none")],
    ["Quota", quota],
    ["Credits", creditsFact(i.credits)],
    ["Metadata", metaList(i.meta)],
    ["Created", time(i.created_at)],
    ["Updated", i.updated_at ? time(i.updated_at) : "never"],
    ["Last used", el("span", {}, time(usage.last_used_at), usage.last_used_ip ? ` from ${usage.last_used_ip}` : "")],
    ["Requests today", String(requests)], ["Error rate", errorRate(usage.error_rate, requests)],
  ]));
  // Its keys, in every namespace and state, newest first (the first 100).
  const keys = await api("GET", `/v1/api-keys?${new URLSearchParams({ identity: i.id, status: "all", limit: 100 })}`)
    .then((r) => r.keys).catch((e) => {
      if (e.status === 401) throw e;
      return null;
    });
  $("identity-keys").replaceChildren(...(keys === null
    ? [el("li", { class: "muted", text: "The keys could not be listed." })]
    : keys.length
      ? keys.map((k) => el("li", { "data-key-id": k.id },
        el("a", { href: `?view=key&id=${encodeURIComponent(k.id)}`,
          onclick: (e) => { e.preventDefault(); go({ view: "key", id: k.id }); } }, k.name || "(unnamed)"),
        " ", el("code", { text: k.id }), ` · ${k.namespace} · ${k.status}`))
      : [el("li", { class: "muted", text: "No key names this identity yet." })]));
  $("identity-chart").replaceChildren(...chart(usage.series || []));
  const codes = Object.entries(usage.by_code_today || {}).filter(([code]) => !/^\d/.test(code) || code >= "400");
  $("identity-refusals").replaceChildren(...(codes.length
    ? codes.map(([code, n]) => el("li", {}, el("code", { text: code }), ` ${n}`))
    : [el("li", { class: "muted", text: "none" })]));
}

let editingIdentity = null;

/** The identity form: a new identity (with `id` filled in, if given), or `identity` to edit. */
function openIdentityForm(identity, id) {
  editingIdentity = identity || null;
  $("identity-form-form").reset();
  clearIdentityErrors();
  $("identity-form-title").textContent = identity ? `Edit ${identity.id}` : "New identity";
  $("identity-form-submit").textContent = identity ? "Save changes" : "Create identity";
  $("identity-edit-warning").hidden = !identity;
  $("i-id").value = identity?.id || id || "";
  $("i-id").disabled = Boolean(identity);
  $("i-limits").replaceChildren(...(identity?.rate_limits || []).map(limitRow));
  numberRows($("i-limits"));
  $("i-quota").value = identity?.quota || "";
  fillCredits("i", identity?.credits);
  $("i-credits").labels[0].textContent = identity?.credits ? "Credits left" : "Credits to start with";
  $("i-credits-hint").textContent = identity?.credits
    ? "What is left now. Changing these sets the credits anew from now; blank removes them."
    : "Spent by all its keys together. A refill sets them back to its amount at 00:00 UTC each day, or on a day of each month. Leave blank for none.";
  $("i-meta").replaceChildren(...Object.entries(identity?.meta || {}).map(([n, v]) => metaRow(n, v)));
  numberRows($("i-meta"));
  $("identity-form").showModal();
  (identity || id ? $("i-quota") : $("i-id")).focus();
}

function clearIdentityErrors() {
  for (const e of $("identity-form").querySelectorAll(".error, .callout")) { e.textContent = ""; e.hidden = true; }
  for (const i of $("identity-form").querySelectorAll("[aria-invalid]")) i.removeAttribute("aria-invalid");
}

const IDENTITY_INPUTS = { id: "#i-id", rate_limits: "#i-limits input", quota: "#i-quota", credits: "#i-credits", meta: "#i-meta input" };

/** Shows `message` beside the identity form's `field` (or at the top), focusing `at` or the field. */
function identityError(field, message, at) {
  const box = $(`ie-${field}`) || $("ie-form");
  box.textContent = message;
  box.hidden = false;
  const input = box.id === "ie-form" ? null : at || (IDENTITY_INPUTS[field] && $("identity-form").querySelector(IDENTITY_INPUTS[field]));
  if (input) input.setAttribute("aria-invalid", "true");
  (input || box).focus();
  (input || box).scrollIntoView?.({ block: "nearest" });
}

/** The identity the form describes as `{id, body}`, or null after showing what is wrong. */
function readIdentityForm() {
  clearIdentityErrors();
  const problems = [];
  const id = editingIdentity?.id || $("i-id").value.trim();
  if (!id) problems.push(["id", "Give the identity your id for the customer, such as cus_123."]);
  else if (new TextEncoder().encode(id).length > 255) problems.push(["id", "An identity is at most 255 bytes."]);
  const rateLimits = readLimits($("i-limits"), problems);
  const quota = $("i-quota").value.trim();
  if (quota && !/^\d+\s*\/\s*[a-z]+$/i.test(quota)) problems.push(["quota", "Write a quota as a count per day or month, such as 10000/day."]);
  const credits = readCredits("i", problems);
  const meta = readMeta($("i-meta"), problems);
  const order = ["id", "rate_limits", "quota", "credits", "meta"];
  problems.sort((a, b) => order.indexOf(a[0]) - order.indexOf(b[0]));
  for (const [field, message, at] of problems.reverse()) identityError(field, message, at);
  if (problems.length) return null;
  const body = {};
  if (rateLimits.length) body.rate_limits = rateLimits;
  if (quota) body.quota = quota.replace(/\s+/g, "");
  if (credits) body.credits = credits;
  if (meta) body.meta = meta;
  return { id, body };
}

async function submitIdentityForm(event) {
  event.preventDefault();
  const v = readIdentityForm();
  if (!v) return;
  const path = `/v1/identities/${encodeURIComponent(v.id)}`;
  $("identity-form-submit").disabled = true;
  try {
    if (editingIdentity) {
      // A merge patch of what changed only: credits left as they were keep what was spent
      // (a PUT would set them anew from what is left now).
      const was = editingIdentity;
      const patch = {};
      if (!sameLimits(v.body.rate_limits, was.rate_limits)) patch.rate_limits = v.body.rate_limits || null;
      if ((v.body.quota || null) !== (was.quota || null)) patch.quota = v.body.quota || null;
      if (!sameCredits(v.body.credits, was.credits)) patch.credits = v.body.credits || null;
      if (!same(v.body.meta, was.meta)) patch.meta = v.body.meta || null;
      if (Object.keys(patch).length) {
        await api("PATCH", path, patch);
        flash(`Saved ${v.id}. Every key that names it has the change now.`);
      } else {
        flash(`Nothing to save: no setting of ${v.id} was changed.`);
      }
    } else {
      // PUT would replace an identity that exists: a new one must be new.
      const there = await api("GET", path).then(() => true, (e) => {
        if (e.status === 404) return false;
        throw e;
      });
      if (there) {
        identityError("id", `An identity “${v.id}” exists already: edit it instead.`);
        return;
      }
      await api("PUT", path, v.body);
      flash(`Created the identity ${v.id}. Keys that name it share its limits from their next request.`);
    }
    $("identity-form").close();
    await render();
  } catch (e) {
    if (e.status === 401) return;
    const field = e.problem.field;
    identityError(field && $(`ie-${field}`) ? field : "form", humanize(e.message));
  } finally {
    $("identity-form-submit").disabled = false;
  }
}

function confirmDeleteIdentity(identity) {
  $("confirm-title").textContent = `Delete the identity ${identity.id}?`;
  $("confirm-text").textContent = `Its keys keep working and keep the name, but from their next request they no longer share its rate limits, quota, credits and metadata.`;
  $("confirm-ok").textContent = "Delete identity";
  $("confirm-ok").className = "danger";
  $("grace-field").hidden = true;
  $("confirm-error").hidden = true;
  $("confirm").onsubmit = async (event) => {
    event.preventDefault();
    try {
      await api("DELETE", `/v1/identities/${encodeURIComponent(identity.id)}`);
      $("confirm").close();
      flash(`Deleted the identity ${identity.id}.`);
      if (params().get("view") === "identity") go({ view: "identities", id: null }, true, true);
      else await render();
    } catch (e) {
      if (e.status !== 401) { $("confirm-error").textContent = humanize(e.message); $("confirm-error").hidden = false; }
    }
  };
  $("confirm").showModal();
  $("confirm-cancel").focus();
}

// ---- wiring ---------------------------------------------------------------------------------

function debounce(fn, ms) {
  let t;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

function wire() {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => signOut("Signed out."));
  $("namespace").addEventListener("change", (e) => go({ ns: e.target.value, view: "keys", id: null }));
  $("nav-keys").addEventListener("click", (e) => { e.preventDefault(); go({ view: "keys", id: null }); });
  $("nav-audit").addEventListener("click", (e) => { e.preventDefault(); go({ view: "audit", id: null }); });
  $("nav-usage").addEventListener("click", (e) => { e.preventDefault(); go({ view: "usage", id: null }); });
  $("nav-alerts").addEventListener("click", (e) => { e.preventDefault(); go({ view: "alerts", id: null }); });
  $("nav-identities").addEventListener("click", (e) => { e.preventDefault(); go({ view: "identities", id: null }); });
  $("identity-back").addEventListener("click", (e) => { e.preventDefault(); go({ view: "identities", id: null }); });
  for (const b of ["identity-new", "identity-empty-new"]) $(b).addEventListener("click", () => openIdentityForm());
  $("identity-missing-create").addEventListener("click", () => openIdentityForm(null, params().get("id")));
  $("identity-edit").addEventListener("click", () => shownIdentity && openIdentityForm(shownIdentity));
  $("identity-delete").addEventListener("click", () => shownIdentity && confirmDeleteIdentity(shownIdentity));
  $("identity-form-form").addEventListener("submit", submitIdentityForm);
  $("identity-form-cancel").addEventListener("click", () => $("identity-form").close());
  $("i-add-limit").addEventListener("click", () => addRow($("i-limits"), limitRow));
  $("i-add-meta").addEventListener("click", () => addRow($("i-meta"), metaRow));
  $("i-interval").addEventListener("change", () => creditsShape("i"));
  // A field's error goes once the field is changed.
  $("identity-form-form").addEventListener("input", (e) => {
    const field = e.target.dataset.field || e.target.name;
    const box = field && $(`ie-${field}`);
    if (box) { box.hidden = true; box.textContent = ""; }
    e.target.removeAttribute("aria-invalid");
  });
  $("topup-form").addEventListener("submit", submitTopUp);
  $("topup-cancel").addEventListener("click", () => $("topup").close());
  for (const r of ["topup-add", "topup-set"]) $(r).addEventListener("change", topUpShape);
  $("topup-amount").addEventListener("input", () => { $("topup-error").hidden = true; $("topup-amount").removeAttribute("aria-invalid"); });
  $("alert-new").addEventListener("click", () => openAlertForm());
  $("alert-form-cancel").addEventListener("click", () => $("alert-form").close());
  $("alert-form-form").addEventListener("submit", submitAlertForm);
  $("a-scope").addEventListener("change", alertFormShape);
  $("a-condition").addEventListener("change", alertFormShape);
  $("back").addEventListener("click", (e) => { e.preventDefault(); go({ view: "keys", id: null }); });
  $("status").addEventListener("change", (e) => go({ status: e.target.value === "active" ? null : e.target.value }, false));
  $("search").addEventListener("input", debounce((e) => go({ q: e.target.value.trim() }, false), 250));
  $("more").addEventListener("click", () => renderKeys(true).catch((e) => flash(e.message, true)));
  $("create").addEventListener("click", () => openKeyForm());
  $("empty-create").addEventListener("click", () => openKeyForm());
  $("empty-clear").addEventListener("click", () => { $("search").value = ""; go({ q: null, status: null }, false); });
  $("cap-link").addEventListener("click", (e) => { e.preventDefault(); go({ view: "keys", id: null, q: null, status: null }); });
  // An open row menu closes on Escape or a click elsewhere.
  document.addEventListener("click", (e) => {
    for (const m of document.querySelectorAll("details.menu[open]")) if (!m.contains(e.target)) m.open = false;
  });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    const m = document.querySelector("details.menu[open]");
    if (m) { m.open = false; m.querySelector("summary").focus(); }
  });
  // Leaving the page while a secret is shown loses it for good: ask first.
  window.addEventListener("beforeunload", (e) => {
    if (releaseSecret) { e.preventDefault(); e.returnValue = ""; }
  });
  $("add-scope").addEventListener("click", () => { const r = scopeRow(); $("scopes").append(r); numberScopes(); r.querySelector("input").focus(); });
  $("add-limit").addEventListener("click", () => addRow($("limits"), limitRow));
  $("add-meta").addEventListener("click", () => addRow($("meta"), metaRow));
  $("f-interval").addEventListener("change", () => creditsShape("f"));
  $("f-cidrs").addEventListener("input", () => { cidrWarning(); checkCidrs(); });
  // A field's error goes once the field is changed.
  $("key-form-form").addEventListener("input", (e) => {
    const field = e.target.dataset.field || e.target.name || (e.target.closest("#scopes") ? "scopes" : "");
    // The CIDR box is checked as it is typed (checkCidrs).
    if (field === "allowed_cidrs") return;
    const box = field && $(`e-${field}`);
    if (box) { box.hidden = true; box.textContent = ""; }
    e.target.removeAttribute("aria-invalid");
  });
  $("key-form-form").addEventListener("submit", submitKeyForm);
  $("key-form-cancel").addEventListener("click", () => $("key-form").close());
  $("copy").addEventListener("click", copySecret);
  $("ack").addEventListener("change", (e) => { $("secret-done").disabled = !e.target.checked; });
  // The secret dialog cannot be left until the copy is acknowledged: Escape is ignored.
  $("secret").addEventListener("cancel", (e) => { if (!$("ack").checked) e.preventDefault(); });
  // Done clears the secret before the dialog closes. Some browsers close a dialog on a
  // repeated Escape regardless: then it comes straight back.
  $("secret-form").addEventListener("submit", (e) => {
    if (!$("ack").checked) e.preventDefault();
    else releaseSecret?.();
  });
  $("secret").addEventListener("close", () => {
    if (releaseSecret && !$("ack").checked) $("secret").showModal();
    else releaseSecret?.();
  });
  $("confirm-cancel").addEventListener("click", () => $("confirm").close());
  for (const b of $("key-actions").querySelectorAll("button")) {
    b.addEventListener("click", () => {
      if (!shownKey) return;
      if (b.dataset.action === "edit") openKeyForm(shownKey);
      else if (b.dataset.action === "credits") openTopUp(shownKey);
      else confirmAction(b.dataset.action, shownKey);
    });
  }
  $("audit-action").append(...ACTIONS.map((a) => el("option", { value: a, text: a })));
  $("audit-action").addEventListener("change", (e) => go({ action: e.target.value }, false));
  $("audit-key").addEventListener("input", debounce((e) => go({ key: e.target.value.trim() }, false), 250));
  for (const bound of ["since", "until"]) {
    $(`audit-${bound}`).addEventListener("change", (e) => go({ [bound]: e.target.value }, false));
  }
  window.addEventListener("popstate", () => { flash(""); render(); });
}

wire();
if (sessionStorage.getItem(TOKEN)) {
  start().catch((e) => { if (e.status !== 401) signOut(e.message); });
} else {
  signOut();
}
