// Jobs: this tenant's fine-tuning jobs, newest first, 20 a page (the API's `after` cursor), refreshed
// every few seconds while any job on the page is unfinished.

import { api } from "../api.js";
import { fill, h, progressText, statusBadge, table, time } from "../ui.js";

const PAGE = 20;
const REFRESH_MS = 4000;
const ACTIVE = new Set(["validating_files", "queued", "running"]);

export async function render(main, _params, signal) {
  const cursors = [null]; // the `after` of each page visited, to go back
  const body = h("div");
  fill(main,
    h("div", { class: "page-head" },
      h("h1", {}, "Fine-tuning jobs"),
      h("a", { class: "button", href: "#/new" }, "New job")),
    body);

  async function load() {
    const after = cursors[cursors.length - 1];
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (after) q.set("after", after);
    const page = await api(`/v1/fine_tuning/jobs?${q}`, { signal });
    if (signal.aborted) return;
    const rows = page.data.map((j) => h("tr", {},
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.id)),
      h("td", {}, statusBadge(j.status)),
      h("td", {}, j.model),
      h("td", {}, j.user_provided_suffix || "—"),
      h("td", {}, time(j.created_at)),
      h("td", {}, progressText(j)),
      h("td", { class: "num" }, j.trained_tokens ?? "—")));
    const newer = h("button", { type: "button", disabled: cursors.length === 1 }, "Newer");
    const older = h("button", { type: "button", disabled: !page.has_more }, "Older");
    newer.addEventListener("click", () => { cursors.pop(); load(); });
    older.addEventListener("click", () => { cursors.push(page.data[page.data.length - 1].id); load(); });
    fill(body,
      page.data.length
        ? table(["Job", "Status", "Base model", "Suffix", "Created", "Progress", "Trained tokens"], rows)
        : h("p", {}, "No jobs yet. ", h("a", { href: "#/new" }, "Start one.")),
      h("div", { class: "pager" }, newer, older));
    if (page.data.some((j) => ACTIVE.has(j.status))) {
      const t = setTimeout(() => load().catch(() => {}), REFRESH_MS);
      signal.addEventListener("abort", () => clearTimeout(t));
    }
  }
  await load();
}
