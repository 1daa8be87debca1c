// Where a guidance map lives in the graph, where its LR image comes from, and how an edit is wired in.
// Only the litegraph node/link API the frontend documents for extensions (inputs, outputs, links, connect).

import { EXTRACTOR_KINDS } from "./extractor_kinds.js";

/** The guidance-map kinds in MS-GAM's input order (from megasr/dage/kinds.py, via the generated module). */
export const MAP_KINDS = Object.freeze([...EXTRACTOR_KINDS.map_kinds]);
/** Map node id -> the map kind it outputs. */
export const MAP_NODE_KINDS = Object.freeze(
  Object.fromEntries(EXTRACTOR_KINDS.kinds.filter((k) => k.map_node).map((k) => [k.map_node, k.kind])),
);
export const EDITED_MAP = "MegaSREditedMap";
export const FUSION = "MegaSRGuidanceFusion";
export const EDITS_SUBFOLDER = "megasr_edits"; // nodes/edited_map.py EDITS_SUBFOLDER
const MAP_INPUTS = MAP_KINDS; // MS-GAM Guidance Fusion's map inputs are named after the kinds
const IMAGE_OUTPUT_NODES = ["SaveImage", "PreviewImage"];

export function typeOf(node) {
  return node?.comfyClass ?? node?.constructor?.comfyClass ?? node?.type;
}

export function getLink(graph, id) {
  if (id === null || id === undefined) return null;
  const links = graph.links;
  return (typeof links?.get === "function" ? links.get(id) : links?.[id]) ?? null;
}

/** The node feeding input `name` of `node`, or null. */
export function inputOrigin(node, name) {
  const slot = node.inputs?.findIndex((i) => i.name === name) ?? -1;
  if (slot < 0) return null;
  const link = getLink(node.graph, node.inputs[slot].link);
  return link ? node.graph.getNodeById(link.origin_id) : null;
}

/** [{ node, slot, name }] for every link leaving output `slot` of `node`. */
export function outputTargets(node, slot = 0) {
  return (node.outputs?.[slot]?.links ?? [])
    .map((id) => getLink(node.graph, id))
    .filter(Boolean)
    .map((l) => {
      const target = node.graph.getNodeById(l.target_id);
      return { node: target, slot: l.target_slot, name: target?.inputs?.[l.target_slot]?.name };
    })
    .filter((t) => t.node);
}

export function widget(node, name) {
  return node?.widgets?.find((w) => w.name === name) ?? null;
}

/** "/view" URL of a file in ComfyUI's input folder given as ComfyUI annotates it ("sub/name.png [input]"). */
export function inputFileUrl(api, value) {
  if (!value || typeof value !== "string") return null;
  let type = "input";
  const m = value.match(/^(.*) \[(input|output|temp)\]$/);
  if (m) [, value, type] = m;
  const cut = value.lastIndexOf("/");
  const subfolder = cut >= 0 ? value.slice(0, cut) : "";
  const filename = cut >= 0 ? value.slice(cut + 1) : value;
  const q = new URLSearchParams({ filename, subfolder, type });
  return api.apiURL(`/view?${q}`);
}

export function outputImageUrl(api, image) {
  const q = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "", type: image.type ?? "output" });
  return api.apiURL(`/view?${q}`);
}

/** Which map a LoadImage feeds: the MS-GAM input name it is linked to (hed / depth / seg), else null. */
function loadImageKind(node) {
  for (const t of outputTargets(node, 0)) {
    if (typeOf(t.node) === FUSION && MAP_INPUTS.includes(t.name)) return t.name;
  }
  return null;
}

/** The map kind a node holds, or null when it is not a guidance map. */
export function mapKindOf(node) {
  const type = typeOf(node);
  if (MAP_NODE_KINDS[type]) return MAP_NODE_KINDS[type];
  if (type === EDITED_MAP) return widget(node, "kind")?.value ?? null;
  if (type === "LoadImage") return loadImageKind(node);
  return null;
}

/** First LoadImage upstream of `node` along its image inputs (lr_image, image, original), as a /view URL. */
export function findLrUrl(api, node, seen = new Set()) {
  if (!node || seen.has(node.id)) return null;
  seen.add(node.id);
  const type = typeOf(node);
  if (type === "LoadImage" && !mapKindOf(node)) return inputFileUrl(api, widget(node, "image")?.value);
  if (type === "LoadImage") {
    // a hand-made map: its LR is the LR image of the MS-GAM node it feeds
    for (const t of outputTargets(node, 0)) {
      if (typeOf(t.node) === FUSION) return findLrUrl(api, inputOrigin(t.node, "lr_image"), seen);
    }
    return null;
  }
  for (const name of ["lr_image", "image", "original", "reference", "images"]) {
    const url = findLrUrl(api, inputOrigin(node, name), seen);
    if (url) return url;
  }
  return null;
}

/** The edited-map node already placed after `source`, if any. */
export function editedNodeAfter(source) {
  return outputTargets(source, 0).find((t) => typeOf(t.node) === EDITED_MAP && t.name === "original")?.node ?? null;
}

/**
 * Puts a MegaSR Edited Map node holding `fileValue` after `source` (a DAGE map node or a map LoadImage), moving
 * the map's consumers onto it, or updates the node when `source` is one already. Returns the edited-map node.
 */
export function wireEditedMap(LiteGraph, graph, source, kind, fileValue) {
  let edited = typeOf(source) === EDITED_MAP ? source : editedNodeAfter(source);
  if (!edited) {
    edited = LiteGraph.createNode(EDITED_MAP);
    edited.pos = [source.pos[0] + (source.size?.[0] ?? 200) + 40, source.pos[1] + 30];
    graph.add(edited);
    const isLoad = typeOf(source) === "LoadImage";
    const moved = outputTargets(source, 0).filter(
      (t) => !isLoad || (typeOf(t.node) === FUSION && t.name === kind) || IMAGE_OUTPUT_NODES.includes(typeOf(t.node)),
    );
    const originalSlot = edited.inputs.findIndex((i) => i.name === "original");
    source.connect(0, edited, originalSlot);
    for (const t of moved) edited.connect(0, t.node, t.slot);
  }
  const kindWidget = widget(edited, "kind");
  if (kindWidget) kindWidget.value = kind;
  const image = widget(edited, "image");
  if (image) {
    const values = image.options?.values;
    if (Array.isArray(values) && !values.includes(fileValue)) values.push(fileValue);
    image.value = fileValue;
    image.callback?.(fileValue);
  }
  graph.setDirtyCanvas?.(true, true);
  return edited;
}

/** Uploads a PNG into input/megasr_edits/ (a taken name gets a new one: nothing is overwritten). */
export async function uploadEdit(api, blob, filename) {
  const form = new FormData();
  form.append("image", new File([blob], filename, { type: "image/png" }));
  form.append("subfolder", EDITS_SUBFOLDER);
  form.append("type", "input");
  const resp = await api.fetchApi("/upload/image", { method: "POST", body: form });
  if (resp.status !== 200) throw new Error(`upload failed: ${resp.status} ${await resp.text()}`);
  const j = await resp.json();
  return j.subfolder ? `${j.subfolder}/${j.name}` : j.name;
}
