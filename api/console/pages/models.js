// Models: the base models this service fine-tunes and this tenant's fine-tuned models; a fine-tuned
// model can be tried in the playground or deleted (its adapter goes; its job stays).

import { api } from "../api.js";
import { actionButton, fill, h, table, time } from "../ui.js";

export async function render(main, _params, signal) {
  const body = h("div");
  fill(main, h("h1", {}, "Models"), body);

  async function load() {
    const page = await api("/v1/models", { signal });
    const rows = page.data.map((m) => {
      const tuned = m.owned_by !== "system";
      return h("tr", {},
        h("td", {}, h("code", {}, m.id)),
        h("td", {}, tuned ? "fine-tuned" : "base"),
        h("td", {}, m.owned_by),
        h("td", {}, time(m.created)),
        h("td", { class: "actions" },
          tuned ? h("a", { class: "button", href: `#/playground?model=${encodeURIComponent(m.id)}` }, "Try") : null,
          tuned ? actionButton("Delete", async () => {
            if (!confirm(`Delete ${m.id}? Its adapter is removed; the job and its events stay.`)) return;
            await api(`/v1/models/${encodeURIComponent(m.id)}`, { method: "DELETE" });
            await load();
          }, { class: "danger", "aria-label": `Delete ${m.id}` }) : null));
    });
    fill(body, table(["Model", "Kind", "Owner", "Created", "Actions"], rows));
  }
  await load();
}
