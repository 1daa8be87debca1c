// Small DOM helpers and the shared look of the MegaSR dialogs (one <style> element, added once).

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "style" && typeof v === "object") Object.assign(node.style, v);
    else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const STYLE_ID = "megasr-workbench-style";
const CSS = `
.megasr-overlay{position:fixed;inset:0;z-index:10000;background:rgba(10,14,18,.92);color:#ddd;
  font:13px system-ui,sans-serif;display:flex;flex-direction:column}
.megasr-bar{display:flex;gap:6px;align-items:center;padding:6px 10px;background:#1e3440;flex-wrap:wrap}
.megasr-bar .megasr-title{font-weight:600;margin-right:12px}
.megasr-overlay button{background:#2a4a5a;color:#eee;border:1px solid #3d6a80;border-radius:4px;padding:3px 9px;
  cursor:pointer;font:inherit}
.megasr-overlay button:disabled{opacity:.4;cursor:default}
.megasr-overlay button.megasr-on{background:#3d7a96;border-color:#8cc8e0}
.megasr-body{flex:1;display:flex;min-height:0}
.megasr-tools{width:190px;padding:8px;display:flex;flex-direction:column;gap:6px;background:#162630;overflow:auto}
.megasr-tools label{display:flex;flex-direction:column;gap:2px;font-size:12px}
.megasr-view{flex:1;position:relative;overflow:hidden;background:#0b0f12;cursor:crosshair;touch-action:none}
.megasr-stage{position:absolute;left:0;top:0;transform-origin:0 0}
.megasr-stage img,.megasr-stage canvas{position:absolute;left:0;top:0}
.megasr-stage canvas{image-rendering:pixelated}
.megasr-classes{width:230px;display:flex;flex-direction:column;background:#162630}
.megasr-classes input{margin:6px;padding:4px}
.megasr-class-list{flex:1;overflow:auto}
.megasr-class{display:flex;gap:6px;align-items:center;padding:2px 8px;cursor:pointer}
.megasr-class:hover{background:#23404e}
.megasr-class.megasr-on{background:#3d7a96}
.megasr-swatch{width:14px;height:14px;border:1px solid #000;flex:none}
.megasr-status{padding:4px 10px;background:#162630;min-height:18px;font-size:12px}
.megasr-compare{position:relative;margin:auto;user-select:none}
.megasr-compare img,.megasr-compare canvas{display:block;position:absolute;left:0;top:0;width:100%;height:100%;
  image-rendering:auto}
.megasr-divider{position:absolute;top:0;bottom:0;width:2px;background:#fff;pointer-events:none}
.megasr-gallery{display:flex;flex-wrap:wrap;gap:12px;padding:12px;overflow:auto}
.megasr-card{background:#162630;border-radius:6px;padding:6px;width:220px;cursor:pointer}
.megasr-card img{width:100%;height:150px;object-fit:contain;background:#000;image-rendering:pixelated}
`;

export function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  document.head.append(el("style", { id: STYLE_ID }, CSS));
}

/** A full-window dialog; Escape closes it unless a text field has the focus. Returns { root, bar, close }. */
export function overlay(title, testid, onClose) {
  ensureStyle();
  const root = el("div", { class: "megasr-overlay", "data-testid": testid, tabindex: "-1" });
  const bar = el("div", { class: "megasr-bar" }, el("span", { class: "megasr-title" }, title));
  root.append(bar);
  const close = () => {
    root.remove();
    onClose?.();
  };
  // keys stay inside the dialog (the canvas underneath must not see them)
  root.addEventListener("keydown", (e) => {
    e.stopPropagation();
    if (e.key === "Escape" && !(e.target instanceof HTMLInputElement)) close();
  });
  root.addEventListener("keyup", (e) => e.stopPropagation());
  document.body.append(root);
  root.focus();
  return { root, bar, close };
}

/** Loads an image URL as RGBA pixels exactly as stored (no colour-space conversion, no premultiplication). */
export async function loadPixels(url) {
  const resp = await fetch(url, { cache: "no-store" });
  if (!resp.ok) throw new Error(`could not load ${url} (${resp.status})`);
  const bitmap = await createImageBitmap(await resp.blob(), {
    colorSpaceConversion: "none",
    premultiplyAlpha: "none",
  });
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const img = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
  bitmap.close();
  return { width: img.width, height: img.height, data: img.data };
}
