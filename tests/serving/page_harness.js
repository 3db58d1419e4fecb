// Runs the page's app.js against a minimal stand-in DOM (node has no browser): reads {models, result} as JSON
// on stdin, renders the result, then moves each slider, and prints what the page shows as JSON on stdout.
"use strict";
const fs = require("fs");
const vm = require("vm");

function element() {
  const own = { children: [], textContent: "", src: "", value: "", max: "", hidden: false, style: {} };
  own.append = (...nodes) => own.children.push(...nodes);
  own.replaceChildren = () => (own.children = []);
  const stub = () => proxy;
  const proxy = new Proxy(own, {
    get: (target, key) => (key in target ? target[key] : key === "then" ? undefined : stub),
    set: (target, key, value) => ((target[key] = value), true),
  });
  return proxy;
}

const elements = {};
const document = {
  getElementById: (id) => (elements[id] = elements[id] || element()),
  createElement: element,
  createElementNS: element,
  querySelectorAll: () => [],
};
const input = JSON.parse(fs.readFileSync(0, "utf8"));
const context = vm.createContext({ document, fetch: () => new Promise(() => {}), console, URL, Math, Number, String });
const code = fs.readFileSync(process.argv[2], "utf8");
vm.runInContext(`${code}\n;globalThis.page = { state, renderResult, showDepth, showSemanticDepth };`, context);
const { page } = context;
page.state.model = input.models.models[0];
page.state.result = input.result;

const names = (id) => elements[id].children.map((item) => item.children[0].textContent);
const view = () => ({
  pixelSlider: [elements["depth-slider"].value, elements["depth-slider"].max],
  semanticSlider: [elements["semantic-slider"].value, elements["semantic-slider"].max],
  recon: elements["recon-image"].src,
  pixelMap: elements["pixel-map"].src,
  semanticMap: elements["semantic-map"].src,
  semanticLabel: elements["semantic-depth-label"].textContent,
  meaning: names("meaning-codes"),
});
page.renderResult();
const start = view();
page.showSemanticDepth(1);
const semanticOne = view();
page.showDepth(1);
const pixelOne = view();
process.stdout.write(JSON.stringify({ start, semanticOne, pixelOne }));
