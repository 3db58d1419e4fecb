// The dualtoken page: upload an image, walk through the depth prefixes, look at both vocabularies.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, limits: null, result: null, file: null };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    // FastAPI's validation errors: a list of {loc, msg}; name the field, not the JSON
    return body.detail.map((e) => `${e.loc[e.loc.length - 1]}: ${e.msg}`).join("; ");
  } catch (_) {
    return response.statusText;
  }
}

// The API key, where the server wants one: asked for once when the API answers 401, kept for this browser tab
// (sessionStorage) and sent on every API call.
const KEY_STORAGE = "dualtoken-api-key";
const keyRequest = { pending: null, resolve: null };

function askForKey(refused) {
  if (!keyRequest.pending) {
    $("key-note").textContent = refused
      ? "The server refused that API key; enter it again."
      : "This server requires an API key.";
    $("key-form").hidden = false;
    $("key-input").focus();
    keyRequest.pending = new Promise((resolve) => (keyRequest.resolve = resolve));
  }
  return keyRequest.pending;  // every call that met the 401 meanwhile waits for the same answer
}

function submitKey(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key || !keyRequest.resolve) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key-input").value = "";
  $("key-form").hidden = true;
  keyRequest.resolve();
  keyRequest.pending = keyRequest.resolve = null;
}

// fetch() for the API: with the key of this session, and on a 401 asks for the key and sends the request again.
async function api(path, options = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    const headers = key === null ? options.headers : { ...options.headers, authorization: `Bearer ${key}` };
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    // a key entered since this call was sent is tried before asking; a key refused meanwhile is asked for once
    const current = sessionStorage.getItem(KEY_STORAGE);
    if (current === key) sessionStorage.removeItem(KEY_STORAGE);
    if (current === key || current === null) await askForKey(key !== null);
  }
}

function showFieldError(id, text) {
  $(id).textContent = text;
}

function mebibytes(bytes) {
  const mib = bytes / 1048576;
  return `${Number.isInteger(mib) ? mib : mib.toFixed(1)} MiB`;
}

async function loadModel() {
  const response = await api("/v1/models");
  const body = await response.json();
  const m = body.models[0];
  state.model = m;
  $("model-info").textContent =
    `${m.name}${m.base_model ? ` (fine-tuned from ${m.base_model})` : ""} · ${m.image_size[0]}×${m.image_size[1]} px · ${m.grid[0]}×${m.grid[1]} tokens · ` +
    `pixel ${m.pixel_depth} × ${m.codebook_size.pixel} codes · semantic ${m.semantic_depth} × ${m.codebook_size.semantic} codes`;
  $("mllm").hidden = !body.mllm;
  showLimits(body.limits);
}

function showLimits(limits) {
  state.limits = limits;
  const formats = limits.allowed_formats.join(", ");
  $("upload-limits").textContent =
    `${formats}; at most ${mebibytes(limits.max_body_bytes)} and ${(limits.max_image_pixels / 1e6).toFixed(0)} ` +
    "megapixels. It is resized and centre-cropped to the model's size.";
  for (const id of ["chat-question", "gen-prompt"]) $(id).maxLength = limits.max_prompt_chars;
  $("chat-limits").textContent = `at most ${limits.max_prompt_chars} characters`;
  $("gen-prompt-limits").textContent = `at most ${limits.max_prompt_chars} characters`;
  $("gen-cfg").max = String(limits.max_cfg_scale);
  $("gen-cfg-limits").textContent = `0 to ${limits.max_cfg_scale}; 1 = off`;
}

function clearResult() {
  state.result = null;
  state.file = null;
  $("results").hidden = true;
  $("chat-answer").textContent = "";
  showFieldError("chat-error", "");
}

async function reconstruct(file) {
  clearResult();
  if (state.limits && file.size > state.limits.max_body_bytes) {
    setStatus(`Could not tokenize ${file.name}: it has ${mebibytes(file.size)}, the limit is ` +
      `${mebibytes(state.limits.max_body_bytes)}`, true);
    return;
  }
  setStatus(`Tokenizing ${file.name}…`);
  const form = new FormData();
  form.append("image", file);
  const response = await api("/v1/reconstruct", { method: "POST", body: form });
  if (!response.ok) {
    setStatus(`Could not tokenize ${file.name}: ${await errorText(response)}`, true);
    return;
  }
  state.file = file;
  state.result = await response.json();
  renderResult();
  setStatus(`${file.name}: ${state.model.grid[0] * state.model.grid[1]} positions, each with ` +
    `${state.model.pixel_depth} pixel + ${state.model.semantic_depth} semantic codes.`);
}

// A sample photo (the server's /static/samples/, open like the page) goes through the same upload as a file.
async function trySample(name) {
  setStatus(`Loading the sample photo ${name}…`);
  const response = await fetch(`/static/samples/${name}.png`);
  if (!response.ok) {
    setStatus(`Could not load the sample photo ${name}: ${await errorText(response)}`, true);
    return;
  }
  await reconstruct(new File([await response.blob()], `${name}.png`, { type: "image/png" }));
}

function renderResult() {
  const r = state.result;
  const depth = r.steps.length;
  const semanticDepth = r.semantic.token_maps.length;
  $("original-image").src = r.original;
  for (const [id, max] of [["depth-slider", depth], ["semantic-slider", semanticDepth]]) {
    $(id).max = String(max);
    $(id).value = String(max);  // both vocabularies start at all their depths
  }
  renderStrip();
  renderQuality();
  renderUsage("pixel", $("pixel-usage"));
  renderUsage("semantic", $("semantic-usage"));
  document.querySelectorAll(".grid-size").forEach((e) => (e.textContent = `${r.grid[0]}×${r.grid[1]}`));
  document.querySelectorAll(".q-pixel").forEach((e) => (e.textContent = String(r.pixel.token_maps.length)));
  document.querySelectorAll(".q-semantic").forEach((e) => (e.textContent = String(semanticDepth)));
  $("results").hidden = false;
  showDepth(depth);
  showSemanticDepth(semanticDepth);
}

// The pixel slider: the reconstruction from the first k pixel depths and the pixel row of the token maps.
function showDepth(k) {
  const r = state.result;
  const step = r.steps[k - 1];
  $("recon-image").src = step.image;
  $("recon-caption").textContent = `reconstruction, k = ${k}`;
  $("depth-label").textContent = `k = ${k} of ${r.steps.length}`;
  $("depth-metrics").textContent = `PSNR ${formatPsnr(step.psnr)} dB · SSIM ${step.ssim.toFixed(3)}`;
  $("pixel-map").src = r.pixel.token_maps[k - 1];
  $("pixel-codes").src = r.pixel.code_maps[k - 1];
  document.querySelectorAll(".k-pixel").forEach((e) => (e.textContent = String(k)));
  document.querySelectorAll("#depth-strip figure").forEach((f, i) => f.classList.toggle("active", i === k - 1));
  document.querySelectorAll("#depth-table tbody tr").forEach((row, i) => row.classList.toggle("active", i === k - 1));
  document.querySelectorAll("#psnr-chart circle").forEach((c, i) => c.classList.toggle("active", i === k - 1));
}

// The semantic slider: what the first k semantic depths say, and the semantic row of the token maps.
function showSemanticDepth(k) {
  const r = state.result;
  $("semantic-depth-label").textContent = `k = ${k} of ${r.semantic.token_maps.length}`;
  $("semantic-map").src = r.semantic.token_maps[k - 1];
  $("semantic-codes").src = r.semantic.code_maps[k - 1];
  document.querySelectorAll(".k-semantic").forEach((e) => (e.textContent = String(k)));
  renderMeaning(k);
}

function renderMeaning(k) {
  const info = state.model.meaning;
  const meaning = state.result.meaning;
  $("meaning-columns").hidden = meaning === null;
  $("meaning-agreement").hidden = meaning === null;
  if (meaning === null) {
    $("meaning-note").textContent = `This model's semantic path cannot be read as classes here: ${info.unavailable}.`;
    return;
  }
  $("meaning-note").textContent =
    `The top-5 ImageNet classes read from the first ${k} semantic depths through the tower's remaining layers, ` +
    `and beside them the same image through the tower without quantization. Classifier: ${info.classifier}.`;
  $("meaning-reference-title").textContent = info.reference;
  const fromCodes = meaning.codes[k - 1];
  renderGuesses($("meaning-codes"), fromCodes, "semantic");
  renderGuesses($("meaning-unquantized"), meaning.unquantized, "reference");
  const reference = meaning.unquantized.map((g) => g.name);
  const shared = fromCodes.filter((g) => reference.includes(g.name)).length;
  const top1 = fromCodes[0].name === reference[0]
    ? `Top-1 agrees: ${reference[0]}.`
    : `Top-1 differs: ${fromCodes[0].name} from the codes, ${reference[0]} without quantization.`;
  $("meaning-agreement").textContent = `${top1} ${shared} of the ${reference.length} top classes are shared.`;
}

function renderGuesses(list, guesses, kind) {
  list.replaceChildren();
  for (const guess of guesses) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "guess-name";
    name.textContent = guess.name;
    const bar = document.createElement("span");
    bar.className = `guess-bar ${kind}`;
    bar.style.width = `${Math.max(1, 100 * guess.probability).toFixed(1)}%`;
    const value = document.createElement("span");
    value.className = "guess-value";
    value.textContent = `${(100 * guess.probability).toFixed(1)}%`;
    const track = document.createElement("span");
    track.className = "guess-track";
    track.append(bar);
    item.append(name, track, value);
    list.append(item);
  }
}

function formatPsnr(value) {
  return value === null ? "∞" : value.toFixed(2);
}

function renderStrip() {
  const strip = $("depth-strip");
  strip.replaceChildren();
  state.result.steps.forEach((step) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = step.image;
    img.alt = `reconstruction, k = ${step.k}`;
    const caption = document.createElement("figcaption");
    caption.textContent = `k = ${step.k}`;
    figure.append(img, caption);
    figure.addEventListener("click", () => {
      $("depth-slider").value = String(step.k);
      showDepth(step.k);
    });
    strip.append(figure);
  });
}

function renderQuality() {
  const steps = state.result.steps;
  const body = $("depth-table").querySelector("tbody");
  body.replaceChildren();
  for (const step of steps) {
    const row = document.createElement("tr");
    for (const text of [String(step.k), formatPsnr(step.psnr), step.ssim.toFixed(3)]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    body.append(row);
  }
  drawChart(steps);
}

function drawChart(steps) {
  const svg = $("psnr-chart");
  const ns = "http://www.w3.org/2000/svg";
  const [width, height, left, right, top, bottom] = [360, 200, 44, 12, 14, 30];
  const values = steps.map((s) => (s.psnr === null ? 99 : s.psnr));
  let low = Math.floor(Math.min(...values) - 1);
  let high = Math.ceil(Math.max(...values) + 1);
  if (high - low < 2) { low -= 1; high += 1; }
  const x = (i) => left + (steps.length === 1 ? (width - left - right) / 2 : (i * (width - left - right)) / (steps.length - 1));
  const y = (v) => top + ((high - v) * (height - top - bottom)) / (high - low);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  svg.replaceChildren();
  add("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, class: "axis" });
  add("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axis" });
  for (const v of [low, (low + high) / 2, high]) {
    add("text", { x: left - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, v.toFixed(0));
  }
  add("text", { x: 12, y: top + (height - top - bottom) / 2, class: "tick", transform: `rotate(-90 12 ${top + (height - top - bottom) / 2})`, "text-anchor": "middle" }, "PSNR dB");
  add("polyline", { points: values.map((v, i) => `${x(i)},${y(v)}`).join(" "), class: "line" });
  values.forEach((v, i) => {
    add("text", { x: x(i), y: height - bottom + 16, class: "tick", "text-anchor": "middle" }, `k=${i + 1}`);
    const dot = add("circle", { cx: x(i), cy: y(v), r: 5, class: "dot" });
    dot.addEventListener("click", () => {
      $("depth-slider").value = String(i + 1);
      showDepth(i + 1);
    });
  });
}

function renderUsage(branch, container) {
  const view = state.result[branch];
  const usage = view.usage;
  container.replaceChildren();
  const title = document.createElement("h3");
  title.textContent = `${branch} vocabulary`;
  const summary = document.createElement("p");
  summary.className = "usage-summary";
  summary.textContent =
    `${usage.unique} distinct codes of ${view.codebook_size} (${(100 * usage.codebook_fraction).toFixed(1)}%)`;
  const depths = document.createElement("div");
  depths.className = "depth-usage";
  const most = Math.min(view.codebook_size, usage.positions);
  usage.per_depth_unique.forEach((unique, q) => {
    const row = document.createElement("label");
    const meter = document.createElement("meter");
    meter.max = most;
    meter.value = unique;
    row.append(`depth ${q + 1}: ${unique} codes of ${most} possible, perplexity ${usage.per_depth_perplexity[q].toFixed(0)} `, meter);
    depths.append(row);
  });
  const canvas = document.createElement("canvas");
  canvas.className = "histogram";
  canvas.width = 512;
  canvas.height = 60;
  drawHistogram(canvas, usage.histogram, branch);
  const axis = document.createElement("p");
  axis.className = "histogram-axis";
  axis.innerHTML = `<span>code 0</span><span>uses per range of the codebook</span><span>${view.codebook_size - 1}</span>`;
  const top = document.createElement("div");
  top.className = "chips";
  for (const [code, count] of usage.top) {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.textContent = `#${code} ×${count}`;
    top.append(chip);
  }
  container.append(title, summary, depths, canvas, axis, top);
}

function drawHistogram(canvas, counts, branch) {
  const context = canvas.getContext("2d");
  const peak = Math.max(1, ...counts);
  const barWidth = canvas.width / counts.length;
  context.fillStyle = branch === "pixel" ? "#e4572e" : "#2e86ab";
  counts.forEach((count, i) => {
    const barHeight = (count / peak) * (canvas.height - 2);
    context.fillRect(i * barWidth, canvas.height - barHeight, Math.max(1, barWidth - 0.5), barHeight);
  });
}

// The browser's own check of an input's limits (required, min, max, maxlength), shown beside the form.
function invalidField(inputs) {
  const bad = inputs.find((input) => !input.checkValidity());
  return bad ? `${bad.closest("label").firstChild.textContent.trim()}: ${bad.validationMessage}` : "";
}

async function ask(event) {
  event.preventDefault();
  $("chat-answer").textContent = "";
  const problem = state.file ? invalidField([$("chat-question")]) : "Upload an image first: the question is about it.";
  showFieldError("chat-error", problem);
  if (problem) return;
  const form = new FormData();
  form.append("image", state.file);
  form.append("question", $("chat-question").value);
  $("chat-answer").textContent = "…";
  const response = await api("/v1/chat", { method: "POST", body: form });
  if (!response.ok) {
    $("chat-answer").textContent = "";
    showFieldError("chat-error", `Could not answer: ${await errorText(response)}`);
    return;
  }
  $("chat-answer").textContent = (await response.json()).answer;
}

async function generate(event) {
  event.preventDefault();
  const problem = invalidField([$("gen-prompt"), $("gen-cfg"), $("gen-seed")]);
  showFieldError("gen-error", problem);
  if (problem) return;
  const body = {
    prompt: $("gen-prompt").value,
    cfg_scale: Number($("gen-cfg").value),
    seed: Number($("gen-seed").value),
  };
  const image = $("gen-image");
  const response = await api("/v1/generate", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    image.hidden = true;  // not the image of an earlier prompt under this error
    showFieldError("gen-error", `Could not generate: ${await errorText(response)}`);
    return;
  }
  if (image.src) URL.revokeObjectURL(image.src);
  image.src = URL.createObjectURL(await response.blob());
  image.hidden = false;
}

function setUp() {
  const input = $("file-input");
  const zone = $("drop-zone");
  input.addEventListener("change", () => input.files.length && reconstruct(input.files[0]));
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) reconstruct(event.dataTransfer.files[0]);
  });
  for (const button of document.querySelectorAll("button[data-sample]")) {
    button.addEventListener("click", () => trySample(button.dataset.sample));
  }
  $("depth-slider").addEventListener("input", (event) => showDepth(Number(event.target.value)));
  $("semantic-slider").addEventListener("input", (event) => showSemanticDepth(Number(event.target.value)));
  $("chat-form").addEventListener("submit", ask);
  $("gen-form").addEventListener("submit", generate);
  $("key-form").addEventListener("submit", submitKey);
  loadModel().catch((error) => setStatus(`Could not reach the server: ${error}`, true));
}

setUp();
