// The console's entry: sign-in, navigation and a router over the URL fragment
// (#/jobs, #/jobs/<id>, #/new, #/files, #/models, #/playground). Each page is a module whose
// render(main, params, signal) fills <main>; `signal` aborts its streams and timers on leaving.

import { api, ApiError, session } from "./api.js";
import { errorBox, field, fill, h } from "./ui.js";
import * as files from "./pages/files.js";
import * as job from "./pages/job.js";
import * as jobs from "./pages/jobs.js";
import * as models from "./pages/models.js";
import * as newJob from "./pages/newjob.js";
import * as playground from "./pages/playground.js";

const routes = [
  [/^#\/jobs\/([^/]+)$/, job, "jobs"],
  [/^#\/jobs$/, jobs, "jobs"],
  [/^#\/new$/, newJob, "new"],
  [/^#\/files$/, files, "files"],
  [/^#\/models$/, models, "models"],
  [/^#\/playground(?:\?.*)?$/, playground, "playground"],
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let leave = null; // aborts the current page's streams and timers

function signInPage(message) {
  const input = h("input", { type: "password", name: "api-key", autocomplete: "off", required: true,
                             placeholder: "sk-qlora-…", spellcheck: "false" });
  const out = h("div", { class: "signin-out" });
  if (message) out.append(errorBox({ message }));
  const form = h("form", { class: "signin", "aria-label": "Sign in" },
    h("h1", {}, "Sign in"),
    h("p", {}, "Use an API key of your tenant (", h("code", {}, "qlora keys create --tenant NAME"),
      " prints one). It is kept in this tab only and sent as a Bearer token."),
    field("API key", input),
    h("button", { type: "submit" }, "Sign in"),
    out);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    session.signIn(key);
    try {
      await api("/v1/models");
    } catch (e) {
      session.signOut();
      const why = e instanceof ApiError && e.status === 401 ? "That API key was refused" : "Cannot reach the service";
      fill(out, errorBox(e, why));
      return;
    }
    if (!location.hash || location.hash === "#/signin") location.hash = "#/jobs";
    else route();
  });
  nav.hidden = true;
  fill(main, form);
  input.focus();
}

async function route() {
  if (leave) leave.abort();
  const mine = new AbortController(); // this visit's; `leave` moves on when the user does
  leave = mine;
  if (!session.key()) {
    signInPage();
    return;
  }
  nav.hidden = false;
  const hash = location.hash || "#/jobs";
  for (const [re, page, section] of routes) {
    const m = hash.match(re);
    if (!m) continue;
    for (const a of nav.querySelectorAll("a")) {
      if (a.dataset.section === section) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    fill(main, h("p", { class: "loading" }, "Loading…"));
    try {
      await page.render(main, m.slice(1).map(decodeURIComponent), mine.signal);
    } catch (e) {
      if (mine.signal.aborted) return; // the user left this page: its errors belong to no one
      if (e instanceof ApiError && e.status === 401) {
        session.signOut();
        signInPage("Your API key is no longer accepted; sign in again.");
        return;
      }
      fill(main, errorBox(e));
    }
    return;
  }
  location.hash = "#/jobs";
}

document.getElementById("signout").addEventListener("click", () => {
  session.signOut();
  if (leave) leave.abort();
  location.hash = "";
  signInPage();
});
window.addEventListener("hashchange", route);
// Leaving a page aborts its requests on purpose; that is not an error worth reporting.
window.addEventListener("unhandledrejection", (ev) => {
  if (ev.reason && ev.reason.name === "AbortError") ev.preventDefault();
});
route();
