// Copy the files the dashboard and /docs serve out of node_modules (after `npm ci`) into
// static/vendor/, with each package's license and a versions.json the tests check against
// package-lock.json. Run by `make dashboard-assets`; nothing is built or changed.
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, "node_modules");
const out = join(here, "static", "vendor");

const FILES = {
  "preact.mjs": "preact/dist/preact.mjs",
  "preact-hooks.mjs": "preact/hooks/dist/hooks.mjs",
  "htm.mjs": "htm/dist/htm.mjs",
  "chart.umd.min.js": "chart.js/dist/chart.umd.min.js",
  "swagger-ui-bundle.js": "swagger-ui-dist/swagger-ui-bundle.js",
  "swagger-ui.css": "swagger-ui-dist/swagger-ui.css",
  "swagger-favicon-32x32.png": "swagger-ui-dist/favicon-32x32.png",
};
const LICENSES = {
  preact: "LICENSE",
  htm: "LICENSE",
  "chart.js": "LICENSE.md",
  "swagger-ui-dist": "LICENSE",
};

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
for (const [name, source] of Object.entries(FILES)) {
  copyFileSync(join(modules, source), join(out, name));
}
const versions = {};
for (const [pkg, license] of Object.entries(LICENSES)) {
  copyFileSync(join(modules, pkg, license), join(out, `${pkg}.LICENSE.txt`));
  versions[pkg] = JSON.parse(readFileSync(join(modules, pkg, "package.json"), "utf8")).version;
}
writeFileSync(join(out, "versions.json"), JSON.stringify(versions, null, 2) + "\n");
console.log(`vendored ${Object.keys(FILES).length} files into ${out}:`, versions);
