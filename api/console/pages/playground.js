// Playground: one prompt, answered side by side by a fine-tuned model and its base model, both
// streamed through POST /v1/chat/completions (what `client.chat.completions.create(stream=True)` gets).

import { api, ApiError, postStream } from "../api.js";
import { errorBox, field, fill, h, notice } from "../ui.js";

const INFERENCE_MISSING = "Inference is not running: start `qlora serve` without --no-inference, or `qlora infer` " +
  "and point QLORA_INFERENCE_URL at it.";

async function stream(model, messages, settings, out, stats, signal) {
  fill(out);
  stats.textContent = "…";
  const started = performance.now();
  let usage = null;
  let first = null;
  try {
    for await (const ev of postStream("/v1/chat/completions",
      { model, messages, stream: true, stream_options: { include_usage: true }, ...settings }, signal)) {
      if (ev.data === "[DONE]") break;
      const chunk = JSON.parse(ev.data);
      if (chunk.error) throw new ApiError(502, chunk);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const text = choice.delta && choice.delta.content;
        if (text) {
          if (first === null) first = performance.now();
          out.append(document.createTextNode(text));
        }
      }
    }
    const secs = (performance.now() - started) / 1000;
    stats.textContent = usage ? `${usage.completion_tokens} tokens in ${secs.toFixed(1)} s` +
      (first !== null ? `, first after ${((first - started) / 1000).toFixed(2)} s` : "") : `${secs.toFixed(1)} s`;
  } catch (e) {
    if (signal.aborted) return;
    stats.textContent = "";
    out.append(errorBox(e.code === "inference_unavailable" ? { message: INFERENCE_MISSING, code: e.code } : e));
  }
}

export async function render(main, _params, signal) {
  const wanted = new URLSearchParams(location.hash.split("?")[1] || "").get("model");
  const jobs = await api("/v1/fine_tuning/jobs?limit=100", { signal });
  const tuned = jobs.data.filter((j) => j.status === "succeeded" && j.fine_tuned_model);
  if (!tuned.length) {
    fill(main, h("h1", {}, "Playground"),
         notice("No fine-tuned model yet: once a job has succeeded, its model can be tried here."));
    return;
  }
  const modelSel = h("select", { name: "model" }, tuned.map((j) =>
    h("option", { value: j.fine_tuned_model, selected: j.fine_tuned_model === wanted }, j.fine_tuned_model)));
  const system = h("textarea", { name: "system", rows: 2, placeholder: "optional" });
  const prompt = h("textarea", { name: "prompt", rows: 4, required: true });
  const maxTokens = h("input", { type: "number", name: "max_tokens", min: 1, max: 4096, value: 128 });
  const temperature = h("input", { type: "number", name: "temperature", min: 0, max: 2, step: 0.1, value: 0 });
  const send = h("button", { type: "submit" }, "Send to both");
  const baseOut = h("div", { class: "answer", "aria-live": "polite" });
  const tunedOut = h("div", { class: "answer", "aria-live": "polite" });
  const baseStats = h("small", { class: "stats" });
  const tunedStats = h("small", { class: "stats" });
  const baseName = h("code");
  const tunedName = h("code");
  const form = h("form", { class: "card", "aria-label": "Prompt" },
    field("Fine-tuned model", modelSel),
    field("System message", system),
    field("User message", prompt),
    h("div", { class: "grid" }, field("Max tokens", maxTokens), field("Temperature", temperature, "0: greedy")),
    send);
  fill(main, h("h1", {}, "Playground"), form,
    h("div", { class: "side-by-side" },
      h("section", { "aria-label": "Fine-tuned model's answer" }, h("h2", {}, "Fine-tuned: ", tunedName), tunedOut, tunedStats),
      h("section", { "aria-label": "Base model's answer" }, h("h2", {}, "Base: ", baseName), baseOut, baseStats)));

  let running = null;
  signal.addEventListener("abort", () => running && running.abort());
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (running) running.abort();
    running = new AbortController();
    const both = AbortSignal.any([signal, running.signal]);
    const job = tuned.find((j) => j.fine_tuned_model === modelSel.value);
    tunedName.textContent = job.fine_tuned_model;
    baseName.textContent = job.model;
    const messages = [];
    if (system.value.trim()) messages.push({ role: "system", content: system.value });
    messages.push({ role: "user", content: prompt.value });
    const settings = { max_tokens: Number(maxTokens.value) || 128, temperature: Number(temperature.value) || 0 };
    send.disabled = true;
    try {
      await Promise.all([stream(job.fine_tuned_model, messages, settings, tunedOut, tunedStats, both),
                         stream(job.model, messages, settings, baseOut, baseStats, both)]);
    } finally {
      send.disabled = false;
    }
  });
}
