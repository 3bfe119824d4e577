// One job: status and progress, the live loss chart (train and validation loss against step, fed by
// the job's SSE event stream, which resumes after a dropped connection), the events log, the
// configuration as resolved, the error of a failed job, checkpoints with their downloads, and cancel.

import { api, download, followEvents } from "../api.js";
import { actionButton, bytes, duration, errorBox, fill, h, progressText, statusBadge, table,
         time } from "../ui.js";
import { LossChart } from "../chart.js";

const ACTIVE = new Set(["validating_files", "queued", "running"]);
const MAX_LOG = 500;

export async function render(main, [jobId], signal) {
  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  let job = await api(base, { signal });

  const head = h("div", { class: "page-head" });
  const summary = h("dl", { class: "summary" });
  const streamState = h("span", { class: "stream-state", role: "status" });
  const chartBox = h("div", { class: "chart", id: "loss-chart", dataset: { points: "0" } });
  const chartNote = h("p", { class: "chart-note" }, "No training steps yet.");
  const errorArea = h("div");
  const checkpoints = h("div");
  const downloads = h("div", { class: "downloads" });
  const config = h("div", { class: "config" });
  const log = h("ol", { class: "events", reversed: true, "aria-label": "Events, newest first" });

  fill(main,
    head,
    errorArea,
    summary,
    h("section", { "aria-labelledby": "h-loss" },
      h("h2", { id: "h-loss" }, "Loss ", streamState), chartBox, chartNote),
    h("section", { "aria-labelledby": "h-out" }, h("h2", { id: "h-out" }, "Downloads"), downloads),
    h("section", { "aria-labelledby": "h-ckpt" }, h("h2", { id: "h-ckpt" }, "Checkpoints"), checkpoints),
    h("section", { "aria-labelledby": "h-events" }, h("h2", { id: "h-events" }, "Events"), log),
    h("section", { "aria-labelledby": "h-config" }, h("h2", { id: "h-config" }, "Configuration"), config));

  const chart = new LossChart(chartBox);
  signal.addEventListener("abort", () => chart.destroy());

  function showJob() {
    const cancel = ACTIVE.has(job.status)
      ? actionButton("Cancel job", async () => {
          job = await api(`${base}/cancel`, { method: "POST" });
          showJob();
        }, { class: "danger" })
      : null;
    fill(head, h("h1", {}, job.id), statusBadge(job.status), cancel);
    const rows = [
      ["Base model", job.model],
      ["Fine-tuned model", job.fine_tuned_model || "—"],
      ["Suffix", job.user_provided_suffix || "—"],
      ["Created", time(job.created_at)],
      ["Finished", time(job.finished_at)],
      ["Progress", progressText(job)],
      ["Trained tokens", job.trained_tokens ?? "—"],
      ["Training file", job.training_file],
      ["Validation file", job.validation_file || "—"],
      ["Estimated peak memory", bytes(job.estimated_memory_bytes)],
    ];
    fill(summary, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    fill(errorArea, job.error ? errorBox({ message: job.error.message, code: job.error.code },
                                         "The job failed") : null);
    showConfig();
    showDownloads();
  }

  function showConfig() {
    const entries = (obj) => Object.entries(obj || {}).map(([k, v]) =>
      [h("dt", {}, k), h("dd", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v))]);
    // The method's own hyperparameters (a DPO job's include beta; it has no top-level ones).
    const method = job.method || { type: "supervised" };
    const hp = (method[method.type] || {}).hyperparameters || job.hyperparameters;
    fill(config,
      h("h3", {}, `Hyperparameters (${method.type})`), h("dl", { class: "kv" }, entries(hp)),
      h("h3", {}, "QLoRA options (resolved)"), h("dl", { class: "kv" }, entries(job.qlora)));
  }

  function showDownloads() {
    if (job.status !== "succeeded") {
      fill(downloads, h("p", {}, ACTIVE.has(job.status)
        ? "The adapter can be downloaded once the job has succeeded."
        : `The job is ${job.status}; it has no final adapter (its checkpoints, if any, are listed below).`));
      return;
    }
    const merged = h("span", { class: "merged-state", role: "status" });
    fill(downloads,
      actionButton("Download adapter", () => download(`${base}/adapter`, `${job.id}-adapter.tar.gz`)),
      actionButton("Download merged model", async () => {
        const status = await download(`${base}/merged`, `${job.id}-merged.tar.gz`);
        merged.textContent = status === 202
          ? "A worker is building the merged model; ask again in a minute." : "";
      }),
      (job.result_files || []).map((id) =>
        actionButton("Download results CSV", () => download(`/v1/files/${encodeURIComponent(id)}/content`,
                                                            `${job.id}-results.csv`))),
      merged);
  }

  async function refreshCheckpoints() {
    const page = await api(`${base}/checkpoints?limit=100`, { signal });
    const rows = page.data.map((c) => h("tr", {},
      h("td", { class: "num" }, c.step_number),
      h("td", {}, Object.entries(c.metrics).filter(([k]) => k !== "step")
        .map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(4) : v}`).join(", ")),
      h("td", {}, time(c.created_at)),
      h("td", {}, actionButton("Download", () => download(
        `${base}/checkpoints/${encodeURIComponent(c.id)}/adapter`, `${job.id}-step-${c.step_number}-adapter.tar.gz`),
        { "aria-label": `Download the adapter of step ${c.step_number}` }))));
    fill(checkpoints, rows.length
      ? table(["Step", "Metrics", "Written", "Adapter"], rows)
      : h("p", {}, "No checkpoints yet."));
  }

  function addEvent(ev) {
    if (ev.type === "metrics" && ev.data) {
      chart.add(ev.data);
      chartBox.dataset.points = String(chart.length);
      chartNote.textContent = `${chart.length} step(s); last train loss ${chart.lastTrain()}`;
    }
    const item = h("li", { class: `event level-${ev.level} type-${ev.type}` },
      h("time", {}, time(ev.created_at)), " ", ev.message);
    log.prepend(item);
    while (log.children.length > MAX_LOG) log.lastChild.remove();
  }

  // Refresh the job object and checkpoints at most every 2 s while events arrive.
  let pending = null;
  function refreshSoon() {
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      try {
        job = await api(base, { signal });
        showJob();
        await refreshCheckpoints();
      } catch (_) { /* the stream's own error handling reports outages */ }
    }, 2000);
  }
  signal.addEventListener("abort", () => clearTimeout(pending));

  showJob();
  await refreshCheckpoints();
  followEvents(jobId, {
    signal,
    onEvent: (ev) => { addEvent(ev); refreshSoon(); },
    onState: async (state) => {
      streamState.textContent = { live: "(live)", reconnecting: "(reconnecting…)", ended: "" }[state];
      if (state !== "ended") return;
      try {
        job = await api(base, { signal });
        showJob();
        await refreshCheckpoints();
      } catch (e) {
        if (!signal.aborted) errorArea.append(errorBox(e));
        return;
      }
      if (job.finished_at && job.created_at) {
        streamState.textContent = `(${job.status} ${duration(job.finished_at - job.created_at)} after it was created)`;
      }
    },
  }).catch((e) => { if (!signal.aborted) errorArea.append(errorBox(e, "The event stream stopped")); });
}
