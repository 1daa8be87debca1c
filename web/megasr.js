// ComfyUI-MegaSR frontend extension: served through WEB_DIRECTORY as /extensions/ComfyUI-MegaSR/megasr.js.
// Small on purpose: it marks the pack's nodes with one colour so MegaSR stages are easy to spot in a graph.
import { app } from "../../scripts/app.js";

const MEGASR_COLOR = "#2a4a5a";
const MEGASR_BGCOLOR = "#1e3440";

app.registerExtension({
  name: "MegaSR.Core",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("MegaSR")) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.color ??= MEGASR_COLOR;
      this.bgcolor ??= MEGASR_BGCOLOR;
      return result;
    };
  },
  async setup() {
    window.MegaSR = Object.freeze({ extension: "MegaSR.Core", version: "0.1.0" });
  },
});
