// DOM helpers. Pages build elements with h() and never assign HTML strings: every value a user or a
// dataset controls (file names, suffixes, event messages, model answers) becomes a text node, so
// `<img src=x onerror=alert(1)>.jsonl` shows as those characters.

/** h("a", {href: "#/jobs", class: "x"}, "text", child, ...) -> element; null children are skipped. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replace `el`'s children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

let fieldSeq = 0;
/** A labelled form control: {label, input} with the label's `for` bound to the control. */
export function field(labelText, control, hint) {
  if (!control.id) control.id = `f${++fieldSeq}`;
  const wrap = h("div", { class: "field" }, h("label", { for: control.id }, labelText), control);
  if (hint) wrap.append(h("small", { class: "hint" }, hint));
  return wrap;
}

/** A table inside a scrolling box (narrow screens scroll it sideways, not the page). */
export function table(headers, rows, caption) {
  return h("div", { class: "table-wrap" },
    h("table", {},
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows)));
}

export function time(ts) {
  if (!ts) return "—";
  return new Date(ts * 1000).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function duration(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, status.replace("_", " "));
}

/** Progress as "step / total, ETA" from a job's `progress` extension. */
export function progressText(job) {
  const p = job.progress;
  if (!p || !p.total_steps) return job.status === "succeeded" ? "done" : "—";
  let text = `${p.steps_completed ?? 0} / ${p.total_steps}`;
  if (job.status === "running" && p.seconds_remaining !== null && p.seconds_remaining !== undefined) {
    text += `, ETA ${duration(p.seconds_remaining)}`;
  }
  return text;
}

/** An alert box: role=alert so screen readers announce it. */
export function errorBox(e, prefix) {
  const code = e && e.code ? ` (${e.code})` : "";
  return h("div", { class: "error", role: "alert" }, `${prefix ? prefix + ": " : ""}${e.message}${code}`);
}

export function notice(text) {
  return h("div", { class: "notice", role: "status" }, text);
}

/** A button that disables itself while `action` runs and shows its error next to it. */
export function actionButton(label, action, attrs) {
  const out = h("span", { class: "action-error", role: "alert" });
  const btn = h("button", { type: "button", ...(attrs || {}) }, label);
  btn.addEventListener("click", async () => {
    btn.disabled = true;
    out.textContent = "";
    try {
      await action(btn);
    } catch (e) {
      out.textContent = e.message;
    } finally {
      btn.disabled = false;
    }
  });
  return h("span", { class: "action" }, btn, out);
}
