// New job: upload a JSONL file (the server's line-numbered validation errors shown next to it), pick
// a base model and the settings, see the peak-memory estimate or the refusal of a job no worker can
// hold (POST /v1/fine_tuning/jobs/estimate, the same checks as creating it), then submit.

import { api, ApiError } from "../api.js";
import { bytes, errorBox, field, fill, h, notice } from "../ui.js";

const ESTIMATE_DELAY_MS = 400;

function numberInput(name, attrs) {
  return h("input", { type: "number", name, inputmode: "decimal", placeholder: "auto", ...attrs });
}

export async function render(main, _params, signal) {
  const [models, filesPage] = await Promise.all([api("/v1/models", { signal }), api("/v1/files?limit=100", { signal })]);
  const bases = models.data.filter((m) => m.owned_by === "system");
  const datasets = filesPage.data.filter((f) => f.purpose === "fine-tune");

  // --- upload -------------------------------------------------------------------------------
  const fileInput = h("input", { type: "file", name: "file", accept: ".jsonl,application/jsonl,application/json" });
  const uploadOut = h("div", { class: "upload-result", "aria-live": "polite" });
  const uploadBtn = h("button", { type: "submit" }, "Upload");
  const uploadForm = h("form", { class: "card", "aria-labelledby": "h-upload" },
    h("h2", { id: "h-upload" }, "1. Upload a dataset"),
    h("p", {}, "JSONL, one chat example per line: ",
      h("code", {}, '{"messages": [{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}]}')),
    field("Dataset file (.jsonl)", fileInput), uploadBtn, uploadOut);

  // --- job settings -------------------------------------------------------------------------
  const model = h("select", { name: "model", required: true },
    bases.map((m) => h("option", { value: m.id }, m.id)));
  const trainSel = h("select", { name: "training_file", required: true });
  const validSel = h("select", { name: "validation_file" });
  function fillFiles(selected) {
    const opts = (none, pick) => [none ? h("option", { value: "" }, none) : null,
      ...datasets.map((f) => h("option", { value: f.id, selected: f.id === pick },
        `${f.filename} (${f.id}, ${bytes(f.bytes)})`))];
    const kept = validSel.value; // an upload picks the training file, never the validation file
    fill(trainSel, datasets.length ? opts(null, selected) : h("option", { value: "" }, "upload a file first"));
    fill(validSel, opts("none", kept));
  }
  fillFiles(null);
  const epochs = numberInput("n_epochs", { min: 1, max: 50, step: 1 });
  const batch = numberInput("batch_size", { min: 1, max: 256, step: 1 });
  const lrMult = numberInput("learning_rate_multiplier", { min: 0.001, max: 1000, step: "any" });
  const rank = numberInput("lora_r", { min: 1, max: 512, step: 1 });
  const suffix = h("input", { type: "text", name: "suffix", maxlength: 64, autocomplete: "off" });
  const estimateOut = h("div", { class: "estimate", role: "status", "aria-live": "polite" });
  const submitOut = h("div", { "aria-live": "polite" });
  const submit = h("button", { type: "submit" }, "Create job");
  const jobForm = h("form", { class: "card", "aria-labelledby": "h-settings" },
    h("h2", { id: "h-settings" }, "2. Choose the model and settings"),
    field("Base model", model),
    field("Training file", trainSel),
    field("Validation file (optional)", validSel),
    h("div", { class: "grid" },
      field("Epochs", epochs, "auto: 3"),
      field("Batch size", batch, "auto: 4"),
      field("Learning-rate multiplier", lrMult, "auto: 1 (of 2e-4)"),
      field("LoRA rank", rank, "default: 64")),
    field("Suffix (optional)", suffix, "up to 64 characters; part of the fine-tuned model's name"),
    h("h3", {}, "Memory"), estimateOut,
    submit, submitOut);

  fill(main, h("h1", {}, "New fine-tuning job"), uploadForm, jobForm);

  function request() {
    const hp = {};
    if (epochs.value) hp.n_epochs = Number(epochs.value);
    if (batch.value) hp.batch_size = Number(batch.value);
    if (lrMult.value) hp.learning_rate_multiplier = Number(lrMult.value);
    const body = { model: model.value, training_file: trainSel.value,
                   method: { type: "supervised", supervised: { hyperparameters: hp } } };
    if (validSel.value) body.validation_file = validSel.value;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    if (rank.value) body.qlora = { lora_r: Number(rank.value) };
    return body;
  }

  let seq = 0;
  let timer = null;
  async function estimate() {
    const mine = ++seq;
    if (!trainSel.value) {
      fill(estimateOut, notice("Upload or pick a training file to see the memory estimate."));
      return;
    }
    try {
      const est = await api("/v1/fine_tuning/jobs/estimate", { method: "POST", json: request(), signal });
      if (mine !== seq) return;
      const largest = est.workers[0];
      fill(estimateOut, h("p", { class: "ok" },
        est.estimated_memory_bytes === null ? "No estimate for this model's shape."
          : `Estimated peak memory: ${bytes(est.estimated_memory_bytes)}.`,
        " ",
        largest ? `Largest live worker: ${largest.device}, ${bytes(largest.device_memory_bytes)}` +
                  (largest.compute_dtype ? `, computing in ${largest.compute_dtype}.` : ".")
                : "No worker is running now; the job waits in the queue for one."));
    } catch (e) {
      if (mine !== seq || signal.aborted) return;
      fill(estimateOut, errorBox(e, e.code === "insufficient_device_memory" ? "No worker can hold this job"
                                                                           : "This job would be refused"));
    }
  }
  jobForm.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(estimate, ESTIMATE_DELAY_MS);
  });
  signal.addEventListener("abort", () => clearTimeout(timer));

  uploadForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = fileInput.files[0];
    if (!file) {
      fill(uploadOut, errorBox({ message: "Choose a .jsonl file first." }));
      return;
    }
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    uploadBtn.disabled = true;
    fill(uploadOut, notice(`Uploading ${file.name}…`));
    try {
      const f = await api("/v1/files", { method: "POST", form });
      datasets.unshift(f);
      fillFiles(f.id);
      fill(uploadOut, h("p", { class: "ok" }, `Uploaded ${f.filename} as ${f.id} (${bytes(f.bytes)}).`));
      estimate();
    } catch (e) {
      const what = e instanceof ApiError && e.code === "invalid_file_format" ? `${file.name} was refused` : "Upload failed";
      fill(uploadOut, errorBox(e, what));
    } finally {
      uploadBtn.disabled = false;
    }
  });

  jobForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: request() });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      fill(submitOut, errorBox(e, "The job was not created"));
    } finally {
      submit.disabled = false;
    }
  });
  estimate();
}
