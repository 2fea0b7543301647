// Drives the /app page in Debian's headless Chromium (playwright-core, no browser download):
// connect, make keys, upload them, choose an image, predict. Prints one JSON line with what
// the page showed (the last answer at the top level, every answer in `runs`). Usage: node e2e.mjs URL API_KEY MODEL IMAGE SCREENSHOT
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, apiKey, model, image, shot] = process.argv.slice(2);
const PASSPHRASE = "correct horse battery staple";
const profile = mkdtempSync(join(tmpdir(), "heinfer-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 900, height: 1300 },
});
const requests = [];
const consoleErrors = [];
try {
  const page = await context.newPage();
  page.on("request", (r) => requests.push({ url: r.url(), method: r.method(), size: (r.postDataBuffer() || []).length }));
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  const res = await page.goto(`${url}/app/`);
  const csp = res.headers()["content-security-policy"];
  const wait = (s, timeout = 120000) => page.waitForFunction(
    (want) => [want, "error"].includes(document.body.dataset.state), s, { timeout });
  const check = async () => {
    const err = await page.textContent("#error");
    if (err) throw new Error(`page error: ${err}`);
  };
  await wait("ready");
  await page.fill("#api-key", apiKey);
  await page.click("#connect");
  await wait("model"); await check();
  await page.selectOption("#model", model);
  await wait("model"); await check();
  await page.fill("#passphrase", PASSPHRASE);
  await page.check("#keep-key");
  await page.click("#make-keys");
  await wait("keys-ready"); await check();
  await page.click("#upload-keys");
  await wait("session"); await check();
  // IMAGE may list several files (comma-separated): each is chosen and predicted in turn
  const more = [];
  for (const [i, file] of image.split(",").entries()) {
    await page.setInputFiles("#image", file);
    await wait("image"); await check();
    await page.click("#predict");
    await wait("done"); await check();
    more.push({ index: Number(await page.getAttribute("#label", "data-index")),
                timings: await page.evaluate(() => ({ ...document.getElementById("timings").dataset })) });
    if (i === 0) await page.screenshot({ path: shot, fullPage: true });
  }
  const out = {
    csp,
    label: await page.textContent("#label"),
    index: Number(await page.getAttribute("#label", "data-index")),
    bars: await page.locator("#chart .bar").count(),
    timings: await page.evaluate(() => ({ ...document.getElementById("timings").dataset })),
    session: (await page.textContent("#upload-status")),
    stored: await page.evaluate(() => new Promise((resolve) => {
      const req = indexedDB.open("heinfer-keys", 1);
      req.onsuccess = () => {
        const g = req.result.transaction("keys").objectStore("keys").getAll();
        g.onsuccess = () => resolve(g.result.map((r) => ({ wrapped: r.wrapped.length, salt: r.salt.length })));
      };
    })),
    requests,
    consoleErrors,
    runs: more,
    // the test unwraps the kept key with the passphrase (as the page would) to look for it in
    // everything the server stored: proof of the wrapping, and the needle for "never sent"
    secretKey: await page.evaluate(async ([pass, name]) => {
      const d = await new Promise((ok) => { const r = indexedDB.open("heinfer-keys", 1); r.onsuccess = () => ok(r.result); });
      const all = await new Promise((ok) => { const g = d.transaction("keys").objectStore("keys").getAll(); g.onsuccess = () => ok(g.result); });
      const ids = await new Promise((ok) => { const g = d.transaction("keys").objectStore("keys").getAllKeys(); g.onsuccess = () => ok(g.result); });
      const i = ids.findIndex((id) => id.split("|")[1] === name);
      const rec = all[i];
      const base = await crypto.subtle.importKey("raw", new TextEncoder().encode(pass), "PBKDF2", false, ["deriveKey"]);
      const k = await crypto.subtle.deriveKey({ name: "PBKDF2", salt: rec.salt, iterations: 600000, hash: "SHA-256" }, base,
                                              { name: "AES-GCM", length: 256 }, false, ["decrypt"]);
      const sk = new Uint8Array(await crypto.subtle.decrypt({ name: "AES-GCM", iv: rec.iv, additionalData: new TextEncoder().encode(ids[i]) }, k, rec.wrapped));
      let bin = ""; sk.forEach((b) => { bin += String.fromCharCode(b); });
      return btoa(bin);
    }, [PASSPHRASE, model]),
  };
  console.log(JSON.stringify(out));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
