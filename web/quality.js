// MegaSR Image Quality: shows the node's scores (its `text` UI output) in a read-only box on the node.
// Listens to the server's documented "executed" event; nothing of the app is patched.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const QUALITY_NODE = "MegaSRImageQuality";
const WIDGET = "scores";

function showScores(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // never stored in the workflow: widget values are positional
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.85;
    }
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "MegaSR.ImageQuality",
  async setup() {
    api.addEventListener("executed", ({ detail }) => {
      const node = app.graph?.getNodeById?.(Number(detail?.display_node ?? detail?.node));
      const text = detail?.output?.text;
      if (!node || (node.comfyClass ?? node.type) !== QUALITY_NODE || !text) return;
      showScores(node, Array.isArray(text) ? text.join("\n") : String(text));
    });
  },
});
