// The /app page: pick a model, make keys, upload the evaluation keys, encrypt an image,
// predict, decrypt. The secret key lives in this page (and, wrapped with the user's passphrase,
// in IndexedDB when asked); it is never sent. Same-origin requests only (CSP connect-src 'self').
import SEAL from "node-seal/throws";
import { Keys, finishOutput, preprocess, softmax } from "./heinfer.js";

const $ = (id) => document.getElementById(id);
const state = { seal: null, models: [], info: null, keys: null, session: null, input: null };
const tick = () => new Promise((r) => setTimeout(r, 0)); // let the page paint between steps

function fail(e) {
  $("error").textContent = String(e && e.message ? e.message : e);
  document.body.dataset.state = "error";
}
function setState(s) { $("error").textContent = ""; document.body.dataset.state = s; }

async function api(path, options = {}) {
  const key = $("api-key").value.trim();
  if (!key) throw new Error("type your API key first");
  const r = await fetch(path, { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } });
  if (!r.ok) {
    let detail = `${r.status}`;
    try { const p = await r.json(); detail = `${p.code || r.status}: ${p.detail || p.title}`; } catch { /* not JSON */ }
    throw new Error(`${path.split("?")[0]}: ${detail}`);
  }
  return r;
}

async function connect() {
  setState("connecting");
  state.models = await (await api("/v1/models")).json();
  const sel = $("model");
  sel.replaceChildren(...state.models.map((m) => new Option(`${m.name} (${m.params})`, m.name)));
  sel.disabled = !state.models.length;
  if (!state.models.length) throw new Error("the server serves no model");
  await pickModel();
}

async function pickModel() {
  state.keys = state.session = null;
  state.info = await (await api(`/v1/models/${encodeURIComponent($("model").value)}`)).json();
  const spec = state.info.spec;
  const [c, h, w] = spec.input_shape;
  $("preview").width = w; $("preview").height = h;
  $("model-info").textContent = `${spec.backend}; input ${c}x${h}x${w}; ` +
    `${spec.output.labels.length} labels; ${spec.rotation_steps.length} rotation keys`;
  $("make-keys").disabled = false;
  $("load-key").disabled = $("forget-key").disabled = !(await storedKey(keyId()));
  $("upload-keys").disabled = $("predict").disabled = true;
  setState("model");
}

// -- secret key storage: IndexedDB, AES-GCM under a PBKDF2 key from the passphrase ---------------
const keyId = () => `${location.origin}|${state.info.name}|${state.info.plan_hash}`;
function db() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open("heinfer-keys", 1);
    req.onupgradeneeded = () => req.result.createObjectStore("keys");
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}
async function idb(mode, fn) {
  const d = await db();
  return new Promise((resolve, reject) => {
    const tx = d.transaction("keys", mode);
    const req = fn(tx.objectStore("keys"));
    tx.oncomplete = () => resolve(req.result);
    tx.onerror = () => reject(tx.error);
  });
}
const storedKey = (id) => idb("readonly", (s) => s.get(id));
async function wrappingKey(passphrase, salt) {
  if (passphrase.length < 8) throw new Error("a passphrase of at least 8 characters is needed to keep the key");
  const base = await crypto.subtle.importKey("raw", new TextEncoder().encode(passphrase), "PBKDF2", false, ["deriveKey"]);
  return crypto.subtle.deriveKey({ name: "PBKDF2", salt, iterations: 600000, hash: "SHA-256" }, base,
                                 { name: "AES-GCM", length: 256 }, false, ["encrypt", "decrypt"]);
}
async function keepKey(keys) {
  const salt = crypto.getRandomValues(new Uint8Array(16));
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const k = await wrappingKey($("passphrase").value, salt);
  const wrapped = new Uint8Array(await crypto.subtle.encrypt({ name: "AES-GCM", iv, additionalData: new TextEncoder().encode(keyId()) }, k, keys.exportSecretKey()));
  await idb("readwrite", (s) => s.put({ salt, iv, wrapped, created: Date.now() }, keyId()));
}
async function unwrapKey() {
  const rec = await storedKey(keyId());
  if (!rec) throw new Error("no stored key for this model");
  const k = await wrappingKey($("passphrase").value, rec.salt);
  try {
    return new Uint8Array(await crypto.subtle.decrypt({ name: "AES-GCM", iv: rec.iv, additionalData: new TextEncoder().encode(keyId()) }, k, rec.wrapped));
  } catch { throw new Error("wrong passphrase (or the stored key was altered)"); }
}

// -- keys -------------------------------------------------------------------------------------------
async function makeKeys(fromStore) {
  setState("keys");
  const p = $("keys-progress");
  const t0 = performance.now();
  p.value = 0.1; $("keys-status").textContent = "loading SEAL (WebAssembly)"; await tick();
  state.seal = state.seal || await SEAL();
  const sk = fromStore ? await unwrapKey() : null;
  p.value = 0.3; $("keys-status").textContent = "secret and public keys"; await tick();
  state.keys = new Keys(state.seal, state.info.spec, sk);
  p.value = 0.5; $("keys-status").textContent = `relinearization and ${state.info.spec.rotation_steps.length} Galois keys`; await tick();
  state.evalBody = state.keys.evalKeysBody();
  state.keygenMs = performance.now() - t0;
  if (!fromStore && $("keep-key").checked) {
    p.value = 0.9; $("keys-status").textContent = "wrapping the secret key"; await tick();
    await keepKey(state.keys);
  }
  p.value = 1;
  $("keys-status").textContent = `keys ready in ${(state.keygenMs / 1000).toFixed(1)} s ` +
    `(${(state.evalBody.length / 1e6).toFixed(1)} MB of evaluation keys to upload)` +
    (!fromStore && $("keep-key").checked ? "; secret key kept, wrapped" : "; secret key only in this page");
  $("upload-keys").disabled = false;
  $("load-key").disabled = $("forget-key").disabled = !(await storedKey(keyId()));
  setState("keys-ready");
}

function upload() {
  setState("uploading");
  const body = state.evalBody;
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1/sessions?model=${encodeURIComponent(state.info.name)}`);
    xhr.setRequestHeader("Authorization", `Bearer ${$("api-key").value.trim()}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => {
      $("upload-progress").value = e.lengthComputable ? e.loaded / e.total : 0.5;
      $("upload-status").textContent = `${(e.loaded / 1e6).toFixed(1)} of ${(body.length / 1e6).toFixed(1)} MB`;
    };
    xhr.onload = () => {
      let doc = null;
      try { doc = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      if (xhr.status !== 201) return reject(new Error(`key upload: ${doc ? `${doc.code}: ${doc.detail}` : xhr.status}`));
      state.session = doc;
      state.keyBytes = body.length;
      $("upload-progress").value = 1;
      $("upload-status").textContent = `session ${doc.session_id.slice(0, 8)}..., ${(body.length / 1e6).toFixed(1)} MB sent`;
      $("predict").disabled = !state.input;
      setState("session");
      resolve();
    };
    xhr.onerror = () => reject(new Error("key upload failed (network)"));
    xhr.send(body);
  });
}

// -- image --------------------------------------------------------------------------------------------
async function takeImage(file) {
  if (!file) return;
  if (!["image/png", "image/jpeg"].includes(file.type)) throw new Error(`${file.name}: PNG or JPEG only`);
  if (!state.info) throw new Error("connect and pick a model first");
  const bmp = await createImageBitmap(file);
  const cv = $("preview");
  const g = cv.getContext("2d", { willReadFrequently: true });
  g.fillStyle = "#000"; g.fillRect(0, 0, cv.width, cv.height);
  g.imageSmoothingEnabled = true; g.imageSmoothingQuality = "high";
  g.drawImage(bmp, 0, 0, cv.width, cv.height); // any size -> the model's H x W
  const rgba = g.getImageData(0, 0, cv.width, cv.height).data;
  const grey = new Uint8Array(cv.width * cv.height);
  for (let i = 0; i < grey.length; i++) {
    grey[i] = Math.round(0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2]);
  }
  const img = g.createImageData(cv.width, cv.height);
  grey.forEach((v, i) => { img.data.set([v, v, v, 255], 4 * i); });
  g.putImageData(img, 0, 0); // shown as the model sees it
  state.input = preprocess(grey, state.info.preprocessing);
  $("image-status").textContent = `${file.name}: ${bmp.width}x${bmp.height} -> ${cv.width}x${cv.height} grey`;
  $("predict").disabled = !state.session;
  setState("image");
}

async function predict() {
  setState("predicting");
  const t0 = performance.now();
  const body = state.keys.encrypt(state.input);
  const t1 = performance.now();
  const r = await api(`/v1/models/${encodeURIComponent(state.info.name)}/predict?session_id=${state.session.session_id}&plan_hash=${state.info.plan_hash}`,
                      { method: "POST", headers: { "Content-Type": "application/octet-stream" }, body });
  const answer = new Uint8Array(await r.arrayBuffer());
  const t2 = performance.now();
  const logits = finishOutput(state.info.spec, state.keys.decrypt(answer), state.input);
  const t3 = performance.now();
  const probs = softmax(logits);
  const labels = state.info.spec.output.labels;
  const top = probs.indexOf(Math.max(...probs));
  $("label").textContent = labels[top] || String(top);
  $("label").dataset.index = String(top);
  $("chart").replaceChildren(...probs.map((p, i) => {
    const row = document.createElement("div");
    row.className = i === top ? "bar top" : "bar";
    const name = document.createElement("span"); name.className = "name"; name.textContent = labels[i] || String(i);
    const fill = document.createElement("span"); fill.className = "fill"; fill.style.width = `${Math.max(1, p * 20)}rem`;
    const val = document.createElement("span"); val.textContent = `${(100 * p).toFixed(1)}%`;
    row.append(name, fill, val);
    return row;
  }));
  const ms = (x) => `${Math.round(x)} ms`;
  $("timings").textContent = `round trip ${ms(t3 - t0)} (encrypt ${ms(t1 - t0)}, server and network ${ms(t2 - t1)}, ` +
    `decrypt ${ms(t3 - t2)}); sent ${(body.length / 1e6).toFixed(2)} MB, received ${(answer.length / 1e3).toFixed(0)} kB; ` +
    `keys made in ${ms(state.keygenMs)}`;
  Object.assign($("timings").dataset, { roundTripMs: (t3 - t0).toFixed(1), encryptMs: (t1 - t0).toFixed(1),
    decryptMs: (t3 - t2).toFixed(1), keygenMs: state.keygenMs.toFixed(1), bytesSent: String(body.length) });
  setState("done");
}

const guard = (fn) => (...a) => Promise.resolve().then(() => fn(...a)).catch(fail);
$("connect").addEventListener("click", guard(connect));
$("model").addEventListener("change", guard(pickModel));
$("make-keys").addEventListener("click", guard(() => makeKeys(false)));
$("load-key").addEventListener("click", guard(() => makeKeys(true)));
$("forget-key").addEventListener("click", guard(async () => {
  await idb("readwrite", (s) => s.delete(keyId()));
  $("load-key").disabled = $("forget-key").disabled = true;
}));
$("upload-keys").addEventListener("click", guard(upload));
$("image").addEventListener("change", guard((e) => takeImage(e.target.files[0])));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", guard((e) => { e.preventDefault(); drop.classList.remove("over"); return takeImage(e.dataTransfer.files[0]); }));
$("predict").addEventListener("click", guard(predict));
document.body.dataset.state = "ready";
