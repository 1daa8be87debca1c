// Before/after: the result over a bicubic upscale of the LR image, split by a slider (0.3.75 has no core
// image-compare widget; newer ComfyUI's Image Compare node is not available on the server we support).
import { bicubicResize } from "./map_ops.js";
import { el, loadPixels, overlay } from "./dom.js";

/** Opens the compare dialog; resolves to { root, setPosition(0..100) } once both images are shown. */
export async function openCompare({ title, resultUrl, lrUrl }) {
  const [result, lr] = await Promise.all([loadPixels(resultUrl), loadPixels(lrUrl)]);
  const { root, bar, close } = overlay(title, "megasr-compare");
  const bicubic = el("canvas", { width: result.width, height: result.height, "data-testid": "megasr-compare-bicubic" });
  const up = bicubicResize(lr.data, lr.width, lr.height, result.width, result.height);
  bicubic.getContext("2d").putImageData(new ImageData(up, result.width, result.height), 0, 0);
  const after = el("img", { src: resultUrl, alt: "result", "data-testid": "megasr-compare-result", draggable: "false" });
  const divider = el("div", { class: "megasr-divider" });
  const slider = el("input", { type: "range", min: 0, max: 100, step: 0.5, value: 50, "data-testid": "megasr-compare-slider" });
  const frame = el("div", { class: "megasr-compare", "data-testid": "megasr-compare-frame" }, after, bicubic, divider);
  const fitFrame = () => {
    const box = root.getBoundingClientRect();
    const s = Math.min((box.width - 40) / result.width, (box.height - 110) / result.height);
    frame.style.width = `${Math.round(result.width * s)}px`;
    frame.style.height = `${Math.round(result.height * s)}px`;
  };
  const setPosition = (pos) => {
    slider.value = String(pos);
    bicubic.style.clipPath = `inset(0 ${100 - pos}% 0 0)`; // left of the divider: bicubic; right: the result
    divider.style.left = `${pos}%`;
  };
  slider.addEventListener("input", () => setPosition(Number(slider.value)));
  frame.addEventListener("pointermove", (e) => {
    if (e.buttons !== 1) return;
    const r = frame.getBoundingClientRect();
    setPosition(Math.min(Math.max(((e.clientX - r.left) / r.width) * 100, 0), 100));
  });
  bar.append(
    el("span", {}, `bicubic ${lr.width}×${lr.height} → ${result.width}×${result.height}  |  left: bicubic, right: result`),
    el("span", { style: { flex: "1" } }),
    el("button", { "data-testid": "megasr-close", onclick: () => close() }, "Close"),
  );
  root.append(el("div", { style: { flex: "1", display: "flex", padding: "12px" } }, frame));
  root.append(el("div", { class: "megasr-bar" }, "bicubic", slider, "result"));
  fitFrame();
  setPosition(50);
  return { root, setPosition, close };
}
