// Every guidance map the last run produced (DAGE map nodes, edited maps, maps saved by Save/Preview Image
// nodes fed from them), one card each; a card opens the map editor on that node.
import { el, overlay } from "./dom.js";

/**
 * @param {object} o
 * @param {{nodeId: string, title: string, kind: string, url: string}[]} o.maps
 * @param {(nodeId: string) => void} o.onOpen
 */
export function openGallery({ maps, onOpen }) {
  const { root, bar, close } = overlay(`Guidance maps of the last run (${maps.length})`, "megasr-gallery");
  bar.append(el("span", { style: { flex: "1" } }), el("button", { "data-testid": "megasr-close", onclick: () => close() }, "Close"));
  const grid = el("div", { class: "megasr-gallery" });
  if (!maps.length) grid.append(el("div", {}, "No guidance map yet: run the graph (Queue) first."));
  for (const m of maps) {
    grid.append(
      el(
        "div",
        {
          class: "megasr-card",
          "data-testid": "megasr-gallery-card",
          "data-kind": m.kind,
          "data-node": m.nodeId,
          title: "Open in the map editor",
          onclick: () => {
            close();
            onOpen(m.nodeId);
          },
        },
        el("img", { src: m.url, alt: m.title }),
        el("div", {}, `${m.kind}: ${m.title} (#${m.nodeId})`),
      ),
    );
  }
  root.append(grid);
  return { root, close };
}
