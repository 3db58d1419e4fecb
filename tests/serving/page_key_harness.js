// The page's API key flow in node: reads {key, models} as JSON on stdin; a stand-in server answers 401 unless a
// request carries "Authorization: Bearer <key>". The page loads, meets the 401, asks; a second API call made while
// it asks waits for the same answer; a wrong key is refused and asked for again; the right one is kept for the
// session and sent on later calls without asking. Prints what happened as JSON on stdout.
"use strict";
const fs = require("fs");
const { loadPage } = require("./page_dom");

const input = JSON.parse(fs.readFileSync(0, "utf8"));
const sent = [];  // [path, the authorization header or null] of every request, in order
function fetch(path, options = {}) {
  const authorization = (options.headers || {}).authorization || null;
  sent.push([path, authorization]);
  const ok = authorization === `Bearer ${input.key}`;
  const body = ok ? input.models : { detail: "this server requires an API key" };
  return Promise.resolve({ ok, status: ok ? 200 : 401, json: async () => body });
}
const settle = () => new Promise((resolve) => setTimeout(resolve, 20));

(async () => {
  const { page, elements, storage } = loadPage(process.argv[2], fetch, ["api", "submitKey"]);
  const form = () => ({ shown: !elements["key-form"].hidden, note: elements["key-note"].textContent });
  const submit = (key) => {
    elements["key-input"].value = key;
    page.submitKey({ preventDefault: () => {} });
  };
  await settle();
  const second = page.api("/healthz");  // made while the page asks: it must not ask a second time
  await settle();
  const asked = { ...form(), sent: sent.length };
  submit("wrong-key");
  await settle();
  const refused = { ...form(), stored: storage.getItem("dualtoken-api-key") };
  submit(` ${input.key} `);
  const secondStatus = (await second).status;
  await settle();
  const accepted = { ...form(), modelInfo: elements["model-info"].textContent, secondStatus };
  const before = sent.length;
  const later = (await page.api("/v1/models")).status;
  process.stdout.write(JSON.stringify({
    asked, refused, accepted, later, laterSent: sent.slice(before), sent,
    stored: storage.getItem("dualtoken-api-key"), input: elements["key-input"].value,
  }));
})();
