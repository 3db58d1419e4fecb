// A minimal stand-in DOM for running the page's app.js in node (node has no browser): elements record what the
// page writes to them, and any method the page calls on them is a no-op.
"use strict";
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

function sessionStorage() {
  const items = new Map();
  return {
    getItem: (key) => (items.has(key) ? items.get(key) : null),
    setItem: (key, value) => items.set(key, String(value)),
    removeItem: (key) => items.delete(key),
  };
}

// Runs app.js (path) with `fetch` in a fresh context; returns {page, elements, storage}: `page` holds the names
// listed in `exported`, `elements` every element the page looked up by id.
function loadPage(path, fetch, exported) {
  const elements = {};
  const document = {
    getElementById: (id) => (elements[id] = elements[id] || element()),
    createElement: element,
    createElementNS: element,
    querySelectorAll: () => [],
  };
  const storage = sessionStorage();
  const context = vm.createContext({
    document, fetch, sessionStorage: storage, console, URL, Math, Number, String, Promise, setTimeout,
  });
  const code = require("fs").readFileSync(path, "utf8");
  vm.runInContext(`${code}\n;globalThis.page = { ${exported.join(", ")} };`, context);
  return { page: context.page, elements, storage };
}

module.exports = { loadPage };
