// The public REST API, as the console calls it: the signed-in key goes in `Authorization: Bearer`
// only (never in a URL, a cookie or localStorage), errors arrive in OpenAI's envelope, and
// Server-Sent Events are read with fetch() because EventSource cannot send that header.

const KEY = "qlora.apiKey";

export const session = {
  key: () => sessionStorage.getItem(KEY),
  signIn: (key) => sessionStorage.setItem(KEY, key),
  signOut: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
    this.param = err.param || null;
  }
}

function headers(extra) {
  const h = new Headers(extra || {});
  const key = session.key();
  if (key) h.set("Authorization", `Bearer ${key}`);
  return h;
}

async function fail(resp) {
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON: the status says enough */ }
  return new ApiError(resp.status, body);
}

/** Call `path` and return its JSON; `json` is sent as the body, `form` as multipart. */
export async function api(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await fail(resp);
  return resp.status === 204 ? null : resp.json();
}

/** Fetch `path` with the key and hand it to the browser as a download named `filename`.
 *  Returns the response status (202: not ready yet, nothing downloaded). */
export async function download(path, filename) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await fail(resp);
  if (resp.status === 202) return 202;
  const url = URL.createObjectURL(await resp.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return resp.status;
}

/** Read a text/event-stream response: yields {id, event, data} for each event. */
export async function* readSse(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const ev = { id: null, event: "message", data: "" };
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") data.push(val);
        else if (field === "id") ev.id = val;
        else if (field === "event") ev.event = val;
      }
      ev.data = data.join("\n");
      yield ev;
    }
  }
}

/** POST `json` to `path` and stream the SSE answer (chat completions with `stream: true`). */
export async function* postStream(path, json, signal) {
  const h = headers({ "Content-Type": "application/json", Accept: "text/event-stream" });
  const resp = await fetch(path, { method: "POST", headers: h, body: JSON.stringify(json), signal });
  if (!resp.ok) throw await fail(resp);
  yield* readSse(resp);
}

/**
 * Follow a job's event stream to its end, resuming after a dropped connection with
 * `Last-Event-ID` (the server replays what came after that event). `onEvent` gets each event
 * object once; `onState` gets "live", "reconnecting" or "ended".
 */
export async function followEvents(jobId, { onEvent, onState, signal }) {
  let lastId = null;
  let delay = 500;
  while (!signal.aborted) {
    try {
      const h = headers({ Accept: "text/event-stream" });
      if (lastId) h.set("Last-Event-ID", lastId);
      const resp = await fetch(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?stream=true`,
                               { headers: h, signal });
      if (!resp.ok) throw await fail(resp);
      onState("live");
      delay = 500;
      for await (const ev of readSse(resp)) {
        if (ev.id) lastId = ev.id;
        if (ev.data) onEvent(JSON.parse(ev.data));
      }
      onState("ended"); // the server closes the stream once the job has finished
      return;
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof ApiError && e.status < 500 && e.status !== 429) throw e;
      onState("reconnecting");
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10_000);
    }
  }
}
