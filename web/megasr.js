// ComfyUI-MegaSR frontend extension, served through WEB_DIRECTORY as /extensions/ComfyUI-MegaSR/megasr.js.
// Uses only the frontend's documented extension hooks (registerExtension: nodeCreated, commands, keybindings,
// settings, getNodeMenuItems, getCanvasMenuItems, setup); nothing of the app is patched. Network: only the
// ComfyUI server (/view, /upload/image, the pack's own static files).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { openCompare } from "./lib/compare.js";
import { openGallery } from "./lib/gallery.js";
import {
  EDITED_MAP,
  MAP_KINDS,
  MAP_NODE_KINDS,
  findLrUrl,
  inputFileUrl,
  mapKindOf,
  outputImageUrl,
  outputTargets,
  typeOf,
  uploadEdit,
  widget,
  wireEditedMap,
} from "./lib/graph.js";
import { MapEditor } from "./lib/map_editor.js";

const VERSION = "0.2.0"; // the pack's one version: pyproject.toml [project] version (tests/test_kind_registry.py)
const MEGASR_COLOR = "#2a4a5a";
const MEGASR_BGCOLOR = "#1e3440";
const OPACITY_SETTING = "MegaSR.MapEditor.MapOpacity";

// --- the last run's image outputs, per node id (from the server's "executed" messages) ---------------
const lastRun = new Map();

function imagesOf(node) {
  const id = String(node.id);
  return lastRun.get(id) ?? app.nodeOutputs?.[id]?.images ?? [];
}

function settingValue(id, fallback) {
  try {
    return app.extensionManager?.setting?.get(id) ?? fallback;
  } catch {
    return fallback;
  }
}

function toast(summary, detail, severity = "warn") {
  const t = app.extensionManager?.toast;
  if (t?.add) t.add({ severity, summary, detail, life: 5000 });
  else console.warn(`[MegaSR] ${summary}: ${detail}`); // no toast service: the console is all there is
}

function selectedNode() {
  const c = app.canvas;
  const fromObject = Object.values(c?.selected_nodes ?? {})[0];
  if (fromObject) return fromObject;
  return [...(c?.selectedItems ?? [])].find((i) => i && i.id !== undefined && Array.isArray(i.inputs)) ?? null;
}

/** Where the map of `node` can be read from now: its last output, or the file it holds. */
function mapUrlOf(node) {
  const type = typeOf(node);
  if (type === EDITED_MAP || type === "LoadImage") return inputFileUrl(api, widget(node, "image")?.value);
  const image = imagesOf(node)[0];
  return image ? outputImageUrl(api, image) : null;
}

let active = null; // the open editor, for tests and for "one editor at a time"

async function openEditor(node, kind = mapKindOf(node)) {
  if (!node || !kind) {
    toast("MegaSR map editor", "Select a guidance map node: a DAGE HED/Depth/Segmentation node, a MegaSR Edited Map, or a Load Image that feeds MS-GAM's hed/depth/seg.");
    return null;
  }
  const mapUrl = mapUrlOf(node);
  if (!mapUrl) {
    toast("MegaSR map editor", `${node.title}: no map yet. Run the graph (Queue) once so the map exists, then edit it.`);
    return null;
  }
  active?.close?.();
  const source = node;
  const editor = new MapEditor({
    kind,
    mapUrl,
    lrUrl: findLrUrl(api, node),
    title: `MegaSR map editor: ${kind} map of “${node.title}” (#${node.id})`,
    opacity: Number(settingValue(OPACITY_SETTING, 0.7)),
    onSave: async (blob) => {
      const base = `${kind}_${typeOf(source) === EDITED_MAP ? "edit" : "node" + source.id}.png`;
      const value = await uploadEdit(api, blob, base);
      const edited = wireEditedMap(window.LiteGraph, source.graph ?? app.graph, source, kind, value);
      editor.editedNodeId = edited.id;
      return value;
    },
    onClose: () => {
      if (active === editor) active = null;
    },
  });
  active = editor;
  await editor.open();
  return editor;
}

function galleryMaps() {
  const maps = [];
  for (const node of app.graph?.nodes ?? []) {
    const kind = MAP_NODE_KINDS[typeOf(node)] ?? (typeOf(node) === EDITED_MAP ? mapKindOf(node) : null);
    if (!kind) continue;
    for (const image of imagesOf(node)) {
      maps.push({ nodeId: String(node.id), title: node.title, kind, url: outputImageUrl(api, image) });
    }
  }
  return maps;
}

function openMapGallery() {
  return openGallery({
    maps: galleryMaps(),
    onOpen: (id) => openEditor(app.graph.getNodeById(Number(id)) ?? app.graph.getNodeById(id)),
  });
}

/** Compare the image output of `node` (e.g. a Save Image after the MegaSR Sampler) with a bicubic upscale of its LR. */
async function compareNode(node) {
  const image = node && imagesOf(node)[0];
  const lrUrl = node && findLrUrl(api, node);
  if (!image || !lrUrl) {
    toast("MegaSR compare", "Select a node that showed a result image in the last run and has a Load Image upstream.");
    return null;
  }
  return openCompare({ title: `Before/after: “${node.title}” vs bicubic`, resultUrl: outputImageUrl(api, image), lrUrl });
}

function nodeMenuItems(node) {
  const items = [];
  const kind = mapKindOf(node);
  if (kind || typeOf(node) === "LoadImage") {
    const kinds = kind ? [kind] : [...MAP_KINDS].reverse();
    for (const k of kinds) {
      items.push({ content: kind ? "Edit map (MegaSR)" : `Edit as ${k} map (MegaSR)`, callback: () => openEditor(node, k) });
    }
  }
  if (imagesOf(node).length && !MAP_NODE_KINDS[typeOf(node)] && typeOf(node) !== EDITED_MAP) {
    items.push({ content: "Compare with bicubic (MegaSR)", callback: () => compareNode(node) });
  }
  return items.length ? [null, ...items] : [];
}

app.registerExtension({
  name: "MegaSR.Core",
  nodeCreated(node) {
    // mark the pack's nodes with one colour so MegaSR stages are easy to spot
    if (!typeOf(node)?.startsWith("MegaSR")) return;
    node.color ??= MEGASR_COLOR;
    node.bgcolor ??= MEGASR_BGCOLOR;
  },
  async setup() {
    window.MegaSR = Object.freeze({ extension: "MegaSR.Core", version: VERSION });
  },
});

app.registerExtension({
  name: "MegaSR.MapWorkbench",
  settings: [
    {
      id: OPACITY_SETTING,
      category: ["MegaSR", "Map editor", "Map opacity"],
      name: "Map opacity over the LR image when the map editor opens",
      type: "slider",
      attrs: { min: 0, max: 1, step: 0.05 },
      defaultValue: 0.7,
    },
  ],
  commands: [
    { id: "MegaSR.EditMap", label: "MegaSR: edit the selected guidance map", function: () => openEditor(selectedNode()) },
    { id: "MegaSR.MapGallery", label: "MegaSR: guidance maps of the last run", function: () => openMapGallery() },
    { id: "MegaSR.CompareResult", label: "MegaSR: compare the selected result with bicubic", function: () => compareNode(selectedNode()) },
  ],
  // Alt+J: bound by no frontend we support (Alt+G is the pinned 1.32's group-node conversion, Alt+M its minimap
  // and 1.58's linear mode); tests/test_web_keybindings.py reads both bundles' tables to keep it that way
  keybindings: [{ commandId: "MegaSR.MapGallery", combo: { key: "j", alt: true } }],
  getNodeMenuItems: nodeMenuItems,
  getCanvasMenuItems() {
    return [null, { content: "Guidance maps of the last run (MegaSR)", callback: () => openMapGallery() }];
  },
  async setup() {
    // a node answered from the server's cache is not executed again (no "executed" message), yet its
    // images are still what this run used: keep them for the gallery and the editor
    let previousRun = new Map();
    api.addEventListener("execution_start", () => {
      previousRun = new Map(lastRun);
      lastRun.clear();
    });
    api.addEventListener("execution_cached", (e) => {
      for (const id of e.detail?.nodes ?? []) {
        const images = previousRun.get(String(id));
        if (images && !lastRun.has(String(id))) lastRun.set(String(id), images);
      }
    });
    api.addEventListener("executed", (e) => {
      const d = e.detail;
      const images = d?.output?.images;
      if (images?.length) lastRun.set(String(d.display_node ?? d.node), images);
    });
    // what the browser tests drive (the same functions the menus and commands call)
    window.MegaSRWorkbench = Object.freeze({
      openEditor: (id, kind) => openEditor(app.graph.getNodeById(Number(id)), kind),
      openGallery: openMapGallery,
      compare: (id) => compareNode(app.graph.getNodeById(Number(id))),
      nodeMenuItems: (id) => nodeMenuItems(app.graph.getNodeById(Number(id))).filter(Boolean).map((i) => i.content),
      editor: () => active,
      lastRun: () => Object.fromEntries(lastRun),
      outputTargets: (id) => outputTargets(app.graph.getNodeById(Number(id))).map((t) => [t.node.id, t.name]),
    });
  },
});
