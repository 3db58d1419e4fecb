// Runs the page's app.js against a minimal stand-in DOM (node has no browser): reads {models, result} as JSON
// on stdin, renders the result, then moves each slider, and prints what the page shows as JSON on stdout.
"use strict";
const fs = require("fs");
const { loadPage } = require("./page_dom");

const input = JSON.parse(fs.readFileSync(0, "utf8"));
const { page, elements } = loadPage(process.argv[2], () => new Promise(() => {}), [
  "state", "renderResult", "showDepth", "showSemanticDepth",
]);
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
