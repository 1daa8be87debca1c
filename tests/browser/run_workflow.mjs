// Drives Debian chromium (playwright-core, no browser download) against a running ComfyUI:
// opens the real frontend, loads a UI-format workflow with app.loadGraphData, checks that no node is
// missing, optionally queues it and waits for the output images, and prints one JSON report on stdout.
//
//   node run_workflow.mjs --url http://127.0.0.1:8188 --workflow wf.json --out DIR [--queue]
//        [--timeout 240000] [--export-graph]   (also report app.graph.serialize(): the frontend's save format)
//        [--build build.js]                    (instead of loading: run build.js in the page; it builds a graph)
//        [--template NAME [--pack ComfyUI-MegaSR]]  (instead of loading: open the Templates browser, pick the
//                                               pack under EXTENSIONS, click the NAME card, as a user does)
//        [--overrides o.json]                  ({"<node id>": {"<widget>": value}}: set widget values before queueing,
//                                               e.g. the tests' tiny model files instead of the shipped names)
//
// Exit status: 0 when the report has ok=true, 1 otherwise (the report says why; a screenshot is saved in DIR).
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

function parseArgs(argv) {
  const args = { timeout: 240000, queue: false, exportGraph: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--queue") args.queue = true;
    else if (a === "--export-graph") args.exportGraph = true;
    else if (a.startsWith("--")) args[a.slice(2).replace(/-(\w)/g, (_, c) => c.toUpperCase())] = argv[++i];
  }
  args.timeout = Number(args.timeout);
  if (!args.url || !args.out || !(args.workflow || args.build || args.template)) {
    console.error("usage: run_workflow.mjs --url URL --out DIR (--workflow FILE | --build FILE | --template NAME)");
    process.exit(2);
  }
  return args;
}

function chromiumPath() {
  if (process.env.CHROMIUM_PATH) return process.env.CHROMIUM_PATH;
  return execFileSync("which", ["chromium"]).toString().trim();
}

const VIRTUAL = ["Reroute", "PrimitiveNode", "Note", "MarkdownNote"];

async function main() {
  const args = parseArgs(process.argv.slice(2));
  fs.mkdirSync(args.out, { recursive: true });
  const report = { ok: false, url: args.url, console_errors: [], page_errors: [], failed_requests: [] };
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "megasr-chromium-"));

  // The modern frontend opens a templates dialog on first start; mark the tutorial done first.
  await fetch(`${args.url}/api/settings`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ "Comfy.TutorialCompleted": true }),
  });

  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath(),
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
    ],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (msg) => {
    if (msg.type() === "error") report.console_errors.push(msg.text().slice(0, 500));
  });
  page.on("pageerror", (err) => report.page_errors.push(String(err).slice(0, 500)));
  page.on("requestfailed", (req) => report.failed_requests.push(req.url()));

  try {
    await page.goto(args.url, { waitUntil: "domcontentloaded", timeout: args.timeout });
    await page.waitForFunction(
      () => window.app?.graph && window.LiteGraph?.registered_node_types?.KSampler && window.app?.api,
      null,
      { timeout: args.timeout },
    );
    report.extensions = await page.evaluate(() => window.app.extensions.map((e) => e.name));

    if (args.build) {
      const code = fs.readFileSync(args.build, "utf-8");
      await page.evaluate(code);
    } else if (args.template) {
      report.template = await page.evaluate(
        async ({ pack, name, timeout }) => {
          const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
          const until = async (fn) => {
            for (let t = 0; t < timeout; t += 200) {
              const v = fn();
              if (v) return v;
              await sleep(200);
            }
            throw new Error("timed out in the templates browser");
          };
          const dialog = () => [...document.querySelectorAll('[role="dialog"], .p-dialog')].pop();
          const leaf = (text) =>
            [...(dialog()?.querySelectorAll("*") ?? [])].find(
              (e) => e.children.length === 0 && e.textContent.trim() === text,
            );
          await window.app.extensionManager.command.execute("Comfy.BrowseTemplates");
          (await until(() => leaf(pack))).click();
          const card = await until(() => leaf(name));
          const listed = dialog().innerText;
          const before = window.app.graph.nodes.length;
          card.click();
          await until(() => !dialog() || window.app.graph.nodes.length !== before);
          await sleep(500);
          return { listed, loaded: window.app.graph.nodes.map((n) => n.type) };
        },
        { pack: args.pack ?? "ComfyUI-MegaSR", name: args.template, timeout: Math.min(args.timeout, 60000) },
      );
    } else {
      const workflow = JSON.parse(fs.readFileSync(args.workflow, "utf-8"));
      const wantIds = workflow.nodes.map((n) => Number(n.id)).sort((a, b) => a - b);
      // Load, and load again if something (a late restore of a previous session) replaced the graph.
      for (let attempt = 0; attempt < 3; attempt++) {
        await page.evaluate(async (wf) => {
          await window.app.loadGraphData(wf, true, true, "megasr-test");
        }, workflow);
        await page.waitForTimeout(300 + 700 * attempt);
        const ids = await page.evaluate(() => window.app.graph.nodes.map((n) => Number(n.id)).sort((a, b) => a - b));
        if (JSON.stringify(ids) === JSON.stringify(wantIds)) break;
        report.reloads = attempt + 1;
      }
    }
    await page.waitForTimeout(500);
    if (args.overrides) {
      const overrides = JSON.parse(fs.readFileSync(args.overrides, "utf-8"));
      report.overrides_applied = await page.evaluate((ov) => {
        const done = [];
        for (const [id, values] of Object.entries(ov)) {
          const node = window.app.graph.getNodeById(Number(id));
          for (const [name, value] of Object.entries(values)) {
            const widget = node?.widgets?.find((w) => w.name === name);
            if (widget) {
              widget.value = value;
              done.push(`${id}.${name}`);
            }
          }
        }
        return done;
      }, overrides);
    }

    const state = await page.evaluate((virtual) => {
      const types = window.LiteGraph.registered_node_types;
      const nodes = window.app.graph.nodes.map((n) => ({
        id: n.id,
        type: n.type,
        registered: !!types[n.type] || virtual.includes(n.type),
        has_errors: !!n.has_errors,
      }));
      const dialogs = [...document.querySelectorAll('[role="dialog"], .p-dialog')].map((d) => d.innerText || "");
      return { nodes, missingDialog: dialogs.some((t) => /missing (nodes|node types)|nodes? (is|are) missing/i.test(t)) };
    }, VIRTUAL);
    report.nodes = state.nodes;
    report.missing = state.nodes.filter((n) => !n.registered || n.has_errors).map((n) => n.type);
    report.missing_dialog = state.missingDialog;
    report.prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
    if (args.exportGraph) report.graph = await page.evaluate(() => window.app.graph.serialize());

    if (report.missing.length || report.missing_dialog) {
      report.error = `missing nodes: ${report.missing.join(", ") || "(dialog shown)"}`;
    } else if (args.queue) {
      // Wait for the image outputs of every SaveImage/PreviewImage node the graph runs.
      const saveIds = await page.evaluate(() =>
        window.app.graph.nodes
          .filter((n) => (n.type === "SaveImage" || n.type === "PreviewImage") && n.mode === 0)
          .map((n) => String(n.id)),
      );
      report.output_nodes = saveIds;
      await page.evaluate(async () => {
        window.__megasrError = null;
        window.app.api.addEventListener("execution_error", (e) => (window.__megasrError = e.detail));
        await window.app.queuePrompt(0, 1);
      });
      // The frontend loads a node's output from /view into its image elements only when it draws the node
      // (node.onDrawBackground), and the canvas draws only the nodes in view. An output node off screen (e.g.
      // seesr_x4's SaveImage at x 2040, past a 1400 px window at the shipped zoom) never gets its images, so
      // do what a user does: look at it. Each poll centres the canvas on the first output node whose images
      // have not loaded yet; loaded images stay on their node, so every output node gets its turn.
      report.centered_on = [];
      await page.waitForFunction(
        (ids) => {
          if (window.__megasrError) return true;
          const loaded = (id) => {
            const imgs = window.app.graph.getNodeById(Number(id))?.imgs ?? [];
            return imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0);
          };
          const pending = ids.find((id) => !loaded(id));
          if (pending === undefined) return ids.length > 0;
          const node = window.app.graph.getNodeById(Number(pending));
          const [x, y, w, h] = window.app.canvas.visible_area ?? [];
          const inView =
            w !== undefined &&
            node.pos[0] >= x &&
            node.pos[1] >= y &&
            node.pos[0] + node.size[0] <= x + w &&
            node.pos[1] + node.size[1] <= y + h;
          if (!inView) {
            window.app.canvas.centerOnNode(node);
            (window.__megasrCentered ??= []).push(pending);
          }
          return false;
        },
        saveIds,
        { timeout: args.timeout, polling: 250 },
      );
      report.centered_on = await page.evaluate(() => [...new Set(window.__megasrCentered ?? [])]);
      report.execution_error = await page.evaluate(() => window.__megasrError);
      report.images = await page.evaluate(
        (ids) =>
          ids.flatMap((id) =>
            (window.app.graph.getNodeById(Number(id)).imgs ?? []).map((img) => ({
              node: id,
              src: img.src,
              width: img.naturalWidth,
              height: img.naturalHeight,
            })),
          ),
        saveIds,
      );
      if (report.execution_error) {
        const e = report.execution_error;
        report.error = `execution_error in node ${e.node_id} (${e.node_type}): ${e.exception_message}`;
      }
      report.ok = report.images.length > 0 && !report.execution_error;
    } else {
      report.ok = true;
    }
  } catch (err) {
    report.error = String(err?.stack ?? err).slice(0, 2000);
  }
  const shot = path.join(args.out, report.ok ? "page.png" : "failure.png");
  try {
    await page.screenshot({ path: shot });
    report.screenshot = shot;
  } catch (err) {
    report.screenshot_error = String(err);
  }
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
  process.stdout.write(JSON.stringify(report) + "\n");
  process.exit(report.ok ? 0 : 1);
}

main().catch((err) => {
  process.stdout.write(JSON.stringify({ ok: false, error: String(err?.stack ?? err) }) + "\n");
  process.exit(1);
});
