// Opens the frontend with the pack loaded and reports what a new user sees on page load: console errors, page
// errors and toasts (the frontend's PrimeVue toasts), then presses the pack's gallery shortcut on the canvas as a
// user would and reports whether the gallery opened and whether a core command ran instead.
//
//   node page_load.mjs --url URL --out DIR [--key j] [--alt 1] [--shift 0]
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].slice(2)] = process.argv[i + 1];
const timeout = 120000;
const report = { ok: false, console_errors: [], console_warnings: [], page_errors: [], toasts: [] };

async function toastTexts(page) {
  return page.evaluate(() => [...document.querySelectorAll(".p-toast-message")].map((t) => t.innerText.trim()));
}

async function main() {
  fs.mkdirSync(args.out, { recursive: true });
  await fetch(`${args.url}/api/settings`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ "Comfy.TutorialCompleted": true }),
  });
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "megasr-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM_PATH || execFileSync("which", ["chromium"]).toString().trim(),
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => {
    if (m.type() === "error") report.console_errors.push(m.text().slice(0, 400));
    if (m.type() === "warning") report.console_warnings.push(m.text().slice(0, 400));
  });
  page.on("pageerror", (err) => report.page_errors.push(String(err).slice(0, 400)));
  report.failed_requests = [];
  page.on("response", (r) => r.status() >= 400 && report.failed_requests.push(`${r.status()} ${r.url()}`));
  try {
    await page.goto(args.url, { waitUntil: "domcontentloaded", timeout });
    // --bare 1: a server without custom nodes (what the frontend logs by itself, for comparison)
    const bare = args.bare === "1";
    await page.waitForFunction((b) => window.app?.graph && (b || window.MegaSRWorkbench), bare, { timeout });
    report.frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
    // toasts raised while extensions register (a refused keybinding is one) show within a second or two
    await page.waitForTimeout(4000);
    report.toasts = await toastTexts(page);
    // the shortcut, pressed on the canvas as a user would
    const canvas = await page.$("#graph-canvas, canvas.graph-canvas, canvas");
    const box = await canvas.boundingBox();
    await page.mouse.click(box.x + box.width / 2, box.y + box.height / 2);
    const combo = [args.alt === "0" ? null : "Alt", args.shift === "1" ? "Shift" : null, (args.key ?? "j").toUpperCase()];
    const before = (await toastTexts(page)).length;
    await page.keyboard.press(combo.filter(Boolean).join("+"));
    report.gallery_opened = await page
      .waitForSelector('[data-testid="megasr-gallery"]', { timeout: 10000 })
      .then(() => true)
      .catch(() => false);
    report.toasts_after_shortcut = (await toastTexts(page)).slice(before);
    report.ok = true;
  } catch (err) {
    report.error = String(err?.stack ?? err).slice(0, 2000);
  } finally {
    fs.writeFileSync(path.join(args.out, "report.json"), JSON.stringify(report, null, 1));
    await context.close();
  }
}

await main();
