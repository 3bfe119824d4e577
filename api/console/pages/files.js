// Files: this tenant's uploaded datasets and results files; download and delete.

import { api, download } from "../api.js";
import { actionButton, bytes, fill, h, table, time } from "../ui.js";

export async function render(main, _params, signal) {
  const body = h("div");
  fill(main, h("div", { class: "page-head" }, h("h1", {}, "Files"), h("a", { class: "button", href: "#/new" }, "Upload a dataset")),
       body);

  async function load() {
    const page = await api("/v1/files?limit=100", { signal });
    const rows = page.data.map((f) => h("tr", {},
      h("td", {}, f.filename),
      h("td", {}, h("code", {}, f.id)),
      h("td", {}, f.purpose),
      h("td", { class: "num" }, bytes(f.bytes)),
      h("td", {}, time(f.created_at)),
      h("td", { class: "actions" },
        actionButton("Download", () => download(`/v1/files/${encodeURIComponent(f.id)}/content`, f.filename),
                     { "aria-label": `Download ${f.filename}` }),
        actionButton("Delete", async () => {
          if (!confirm(`Delete ${f.filename} (${f.id})? Jobs that used it keep their results.`)) return;
          await api(`/v1/files/${encodeURIComponent(f.id)}`, { method: "DELETE" });
          await load();
        }, { class: "danger", "aria-label": `Delete ${f.filename}` }))));
    fill(body, rows.length ? table(["Name", "ID", "Purpose", "Size", "Uploaded", "Actions"], rows)
                           : h("p", {}, "No files yet."));
  }
  await load();
}
