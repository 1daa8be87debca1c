// Drives the MegaSR map workbench (web/megasr.js) in the real frontend, in Debian chromium (playwright-core):
// loads a workflow, runs it, opens the map editor on map nodes through the pack's command (as the menu does),
// paints with real mouse strokes, saves, undoes, re-runs, opens the gallery and the compare slider, reloads the
// page and re-opens the saved graph. Writes one JSON report to DIR/report.json; tests/web/test_browser_workbench.py checks it.
//
//   node workbench.mjs --url URL --out DIR --plan plan.json
//
// plan: { workflow: <UI json path>, overrides: {id: {widget: value}}, vue: bool, edits: [{node, kind, cls?,
//         tool, size, hardness?, from: [x, y], to: [x, y], shot?}], gallery_shot?, compare: {node, shot?},
//         reload: bool, timeout }
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].slice(2)] = process.argv[i + 1];
const plan = JSON.parse(fs.readFileSync(args.plan, "utf-8"));
const timeout = plan.timeout ?? 180000;
const report = { ok: false, steps: [], page_errors: [], console_errors: [] };
const step = (name, data = {}) => report.steps.push({ name, ...data });

function chromiumPath() {
  return process.env.CHROMIUM_PATH || execFileSync("which", ["chromium"]).toString().trim();
}

async function settings(values) {
  await fetch(`${args.url}/api/settings`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(values),
  });
}

async function waitReady(page) {
  await page.waitForFunction(
    () => window.app?.graph && window.LiteGraph?.registered_node_types?.KSampler && window.MegaSRWorkbench,
    null,
    { timeout },
  );
}

async function loadGraph(page, wf) {
  const want = wf.nodes.map((n) => Number(n.id)).sort((a, b) => a - b);
  for (let attempt = 0; attempt < 3; attempt++) {
    await page.evaluate(async (w) => window.app.loadGraphData(w, true, true, "megasr-workbench"), wf);
    await page.waitForTimeout(400 + 700 * attempt);
    const ids = await page.evaluate(() => window.app.graph.nodes.map((n) => Number(n.id)).sort((a, b) => a - b));
    if (ids.length >= want.length && want.every((id) => ids.includes(id))) return;
  }
}

/** Queue the graph; wait until every node in `waitIds` reported images in this run. */
async function queueAndWait(page, waitIds) {
  // a prompt the server refuses (validation) raises no execution_error: read the /prompt answer itself
  const answer = page.waitForResponse((r) => r.url().endsWith("/prompt") && r.request().method() === "POST", {
    timeout,
  });
  await page.evaluate(async () => {
    window.__megasrError = null;
    window.__megasrDone = false;
    if (!window.__megasrHooked) {
      window.app.api.addEventListener("execution_error", (e) => (window.__megasrError = e.detail));
      window.app.api.addEventListener("execution_success", () => (window.__megasrDone = true));
      window.__megasrHooked = true;
    }
    await window.app.queuePrompt(0, 1);
  });
  const res = await answer;
  if (res.status() !== 200) {
    report.refused_prompt = res.request().postDataJSON()?.prompt ?? null;
    throw new Error(`the server refused the prompt (${res.status()}): ${(await res.text()).slice(0, 2500)}`);
  }
  await page.waitForFunction(
    (ids) => {
      if (window.__megasrError) return true;
      const run = window.MegaSRWorkbench.lastRun();
      return window.__megasrDone && ids.every((id) => run[String(id)]?.length);
    },
    waitIds.map(String),
    { timeout, polling: 250 },
  );
  const err = await page.evaluate(() => window.__megasrError);
  if (err) throw new Error(`execution_error in node ${err.node_id} (${err.node_type}): ${err.exception_message}`);
  return page.evaluate(() => window.MegaSRWorkbench.lastRun());
}

async function openEditorByCommand(page, nodeId) {
  await page.evaluate(async (id) => {
    const node = window.app.graph.getNodeById(id);
    window.app.canvas.deselectAll?.();
    window.app.canvas.selectNode(node);
    await window.app.extensionManager.command.execute("MegaSR.EditMap");
  }, nodeId);
  await page.waitForSelector('[data-testid="megasr-map-canvas"]', { timeout: 30000 });
  await page.waitForTimeout(300);
}

async function stroke(page, from, to) {
  const pts = await page.evaluate(
    ([a, b]) => {
      const ed = window.MegaSRWorkbench.editor();
      return [ed.clientPoint(a[0], a[1]), ed.clientPoint(b[0], b[1])];
    },
    [from, to],
  );
  // clientPoint gives pixel centres; the stroke is wanted exactly through (x + .5, y + .5)
  await page.mouse.move(pts[0][0], pts[0][1]);
  await page.mouse.down();
  await page.mouse.move(pts[1][0], pts[1][1], { steps: 12 });
  await page.mouse.up();
}

async function setSlider(page, testid, value) {
  await page.evaluate(
    ([id, v]) => {
      const input = document.querySelector(`[data-testid="${id}"]`);
      input.value = String(v);
      input.dispatchEvent(new Event("input", { bubbles: true }));
    },
    [testid, value],
  );
}

async function doEdit(page, e) {
  await openEditorByCommand(page, e.node);
  const res = { node: e.node, kind: e.kind };
  res.menu = await page.evaluate((id) => window.MegaSRWorkbench.nodeMenuItems(id), e.node);
  // the node context menu the frontend itself builds (litegraph canvas + extensions' getNodeMenuItems)
  res.native_menu = await page.evaluate((id) => {
    const node = window.app.graph.getNodeById(id);
    try {
      return (window.app.canvas.getNodeMenuOptions?.(node) ?? null)?.filter(Boolean).map((o) => o.content) ?? null;
    } catch (err) {
      return [`error: ${err}`];
    }
  }, e.node);
  res.original = await page.evaluate(() => window.MegaSRWorkbench.editor().pixels());
  res.size = await page.evaluate(() => [window.MegaSRWorkbench.editor().map.width, window.MegaSRWorkbench.editor().map.height]);
  res.has_lr = await page.evaluate(() => !!document.querySelector('[data-testid="megasr-map-editor"] img[alt="LR image"]'));
  if (e.cls) {
    await page.fill('[data-testid="megasr-class-search"]', e.cls);
    await page.press('[data-testid="megasr-class-search"]', "Enter");
    res.visible_classes = await page.evaluate(() =>
      [...document.querySelectorAll(".megasr-class")].filter((r) => r.style.display !== "none").map((r) => r.dataset.class),
    );
    res.current_class = await page.textContent('[data-testid="megasr-current-class"]');
  }
  await page.click(`[data-testid="megasr-tool-${e.tool}"]`);
  await setSlider(page, "megasr-size", e.size);
  if (e.hardness !== undefined) await setSlider(page, "megasr-hardness", e.hardness);
  await stroke(page, e.from, e.to);
  const mid = [Math.round((e.from[0] + e.to[0]) / 2), Math.round((e.from[1] + e.to[1]) / 2)];
  const p = await page.evaluate((m) => window.MegaSRWorkbench.editor().clientPoint(m[0], m[1]), mid);
  await page.mouse.move(p[0], p[1]);
  res.hover = await page.textContent('[data-testid="megasr-status"]');
  res.edited = await page.evaluate(() => window.MegaSRWorkbench.editor().pixels());
  if (e.shot) await page.screenshot({ path: path.join(args.out, e.shot) });
  await page.click('[data-testid="megasr-save"]');
  await page.waitForFunction(() => document.querySelector('[data-testid="megasr-map-editor"]')?.dataset.saved, null, {
    timeout: 30000,
  });
  res.saved = await page.evaluate(() => document.querySelector('[data-testid="megasr-map-editor"]').dataset.saved);
  res.edited_node = await page.evaluate(() => window.MegaSRWorkbench.editor().editedNodeId);
  // undo gives the original back bit for bit, redo the edit
  await page.click('[data-testid="megasr-undo"]');
  res.after_undo_equals_original = await page.evaluate(
    (orig) => JSON.stringify(window.MegaSRWorkbench.editor().pixels()) === JSON.stringify(orig),
    res.original,
  );
  await page.click('[data-testid="megasr-redo"]');
  res.after_redo_equals_edit = await page.evaluate(
    (ed) => JSON.stringify(window.MegaSRWorkbench.editor().pixels()) === JSON.stringify(ed),
    res.edited,
  );
  await page.click('[data-testid="megasr-close"]');
  res.wiring = await page.evaluate((id) => {
    const n = window.app.graph.getNodeById(id);
    const orig = n.inputs.find((i) => i.name === "original");
    const link = orig?.link != null ? (window.app.graph.links.get?.(orig.link) ?? window.app.graph.links[orig.link]) : null;
    return {
      type: n.type,
      widgets: Object.fromEntries(n.widgets.map((w) => [w.name, w.value])),
      original_from: link?.origin_id ?? null,
      targets: window.MegaSRWorkbench.outputTargets(id),
    };
  }, res.edited_node);
  // the compact form the python side needs; the full pixel arrays are large
  delete res.original;
  delete res.edited;
  step("edit", res);
}

async function main() {
  fs.mkdirSync(args.out, { recursive: true });
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "megasr-chromium-"));
  await settings({ "Comfy.TutorialCompleted": true, "Comfy.VueNodes.Enabled": !!plan.vue });
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath(),
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => m.type() === "error" && report.console_errors.push(m.text().slice(0, 400)));
  page.on("pageerror", (err) => report.page_errors.push(String(err).slice(0, 400)));
  try {
    await page.goto(args.url, { waitUntil: "domcontentloaded", timeout });
    await waitReady(page);
    report.frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
    report.vue_nodes = await page.evaluate(() => window.app.extensionManager.setting.get("Comfy.VueNodes.Enabled"));
    report.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name));
    const wf = JSON.parse(fs.readFileSync(plan.workflow, "utf-8"));
    await loadGraph(page, wf);
    await page.evaluate((ov) => {
      for (const [id, values] of Object.entries(ov ?? {})) {
        const node = window.app.graph.getNodeById(Number(id));
        for (const [name, value] of Object.entries(values)) {
          const w = node?.widgets?.find((x) => x.name === name);
          if (w) w.value = value;
        }
      }
    }, plan.overrides);
    const mapIds = plan.edits.map((e) => e.node);
    report.first_run = await queueAndWait(page, [...mapIds, ...(plan.wait ?? [])]);
    step("first run");
    for (const e of plan.edits) await doEdit(page, e);
    report.edited_prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
    if (plan.queue_after !== false) {
      report.second_run = await queueAndWait(page, plan.wait ?? []);
      step("second run");
    }
    if (plan.gallery) {
      await page.evaluate(() => window.app.extensionManager.command.execute("MegaSR.MapGallery"));
      await page.waitForSelector('[data-testid="megasr-gallery"]', { timeout: 20000 });
      await page.waitForFunction(
        () => [...document.querySelectorAll('[data-testid="megasr-gallery-card"] img')].every((i) => i.complete && i.naturalWidth > 0),
        null,
        { timeout: 20000 },
      );
      report.gallery = await page.evaluate(() =>
        [...document.querySelectorAll('[data-testid="megasr-gallery-card"]')].map((c) => ({
          kind: c.dataset.kind,
          node: c.dataset.node,
          width: c.querySelector("img").naturalWidth,
        })),
      );
      if (plan.gallery_shot) await page.screenshot({ path: path.join(args.out, plan.gallery_shot) });
      await page.click('[data-testid="megasr-gallery"] [data-testid="megasr-close"]');
      report.canvas_menu = await page.evaluate(() =>
        window.app.extensions
          .filter((x) => x.name === "MegaSR.MapWorkbench")
          .flatMap((x) => x.getCanvasMenuItems(window.app.canvas))
          .filter(Boolean)
          .map((i) => i.content),
      );
    }
    if (plan.compare) {
      await page.evaluate(async (id) => {
        window.app.canvas.selectNode(window.app.graph.getNodeById(id));
        await window.app.extensionManager.command.execute("MegaSR.CompareResult");
      }, plan.compare.node);
      await page.waitForSelector('[data-testid="megasr-compare-bicubic"]', { timeout: 30000 });
      await page.waitForFunction(() => document.querySelector('[data-testid="megasr-compare-result"]').naturalWidth > 0);
      await setSlider(page, "megasr-compare-slider", 30);
      report.compare = await page.evaluate(() => {
        const c = document.querySelector('[data-testid="megasr-compare-bicubic"]');
        const img = document.querySelector('[data-testid="megasr-compare-result"]');
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        return {
          bicubic_size: [c.width, c.height],
          result_size: [img.naturalWidth, img.naturalHeight],
          clip: c.style.clipPath,
          bicubic_png: c.toDataURL("image/png"),
          nonzero: d.some((v, i) => i % 4 !== 3 && v > 0),
        };
      });
      if (plan.compare.shot) await page.screenshot({ path: path.join(args.out, plan.compare.shot) });
      await page.click('[data-testid="megasr-compare"] [data-testid="megasr-close"]');
    }
    if (plan.reload) {
      // as a user: the workflow saved to a file, the page reloaded, the file opened again
      const saved = await page.evaluate(() => window.app.graph.serialize());
      await page.reload({ waitUntil: "domcontentloaded" });
      await waitReady(page);
      await loadGraph(page, saved);
      const last = plan.edits[plan.edits.length - 1];
      const editedId = report.steps.filter((s) => s.name === "edit").pop().edited_node;
      report.reloaded_prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
      await openEditorByCommand(page, editedId);
      report.reopened = await page.evaluate(() => {
        const ed = window.MegaSRWorkbench.editor();
        return { kind: ed.kind, url: ed.o.mapUrl, size: [ed.map.width, ed.map.height] };
      });
      report.reopened.kind_expected = last.kind;
      await page.click('[data-testid="megasr-close"]');
    }
    report.ok = true;
  } catch (err) {
    report.error = String(err?.stack ?? err).slice(0, 3000);
    try {
      await page.screenshot({ path: path.join(args.out, "failure.png") });
    } catch {}
  }
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
  // the report can be large (a data URL): a file, since process.exit() may cut a piped stdout short
  fs.writeFileSync(path.join(args.out, "report.json"), JSON.stringify(report));
  process.exitCode = report.ok ? 0 : 1;
}

main().catch((err) => {
  fs.writeFileSync(path.join(args.out, "report.json"), JSON.stringify({ ok: false, error: String(err?.stack ?? err) }));
  process.exitCode = 1;
});
