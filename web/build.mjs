// Builds the /app page into server/static/app (committed: `heinfer serve` needs no Node.js).
// `npm ci && npm run build` in web/ reproduces it byte for byte from package-lock.json.
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";

// HEINFER_WEB_OUT: build elsewhere (tests/test_browser.py compares with the committed files)
const out = process.env.HEINFER_WEB_OUT || new URL("../server/static/app/", import.meta.url).pathname;
mkdirSync(out, { recursive: true });
await build({
  entryPoints: ["src/app.js"],
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "chrome120",
  minify: true,
  legalComments: "eof",
  external: ["module"], // node-seal's Node.js-only branch, never taken in a browser
  outfile: `${out}app.js`,
});
copyFileSync("node_modules/node-seal/dist/seal_throws.wasm", `${out}seal_throws.wasm`);
for (const f of ["index.html", "app.css"]) copyFileSync(`static/${f}`, `${out}${f}`);
console.log(`built ${out}`);
