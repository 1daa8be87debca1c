"""Importing the pack (and registering its nodes) prints nothing, touches no network, loads no heavy library.

Run in a fresh interpreter: ComfyUI itself is imported first (as at start-up), then the pack is imported
from ComfyUI's custom_nodes folder and its V3 entry point asked for the node list.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from harness.paths import PACK_NAME, REPO_ROOT, apply_offline_env

HEAVY = ("diffusers", "transformers", "controlnet_aux", "peft", "accelerate", "timm", "kornia", "cv2")

SCRIPT = textwrap.dedent(
    """
    import asyncio, contextlib, io, json, socket, sys, importlib.util
    sys.path.insert(0, {tests!r})
    from harness import comfy
    root = comfy.bootstrap()
    import comfy.model_management  # noqa: F401  (ComfyUI is up before custom nodes load)
    import nodes  # noqa: F401
    touched = []
    def no_network(self, address, *a, **k):
        touched.append(str(address))
        raise OSError("network access during pack import")
    socket.socket.connect = no_network
    before = set(sys.modules)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        folder = root / "custom_nodes" / {pack!r}
        spec = importlib.util.spec_from_file_location(
            {pack!r}, str(folder / "__init__.py"), submodule_search_locations=[str(folder)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[{pack!r}] = mod
        spec.loader.exec_module(mod)
        ext = asyncio.run(mod.comfy_entrypoint())
        node_list = asyncio.run(ext.get_node_list())
    new = sorted(m.split(".")[0] for m in set(sys.modules) - before)
    print(json.dumps({{
        "stdout": out.getvalue(), "network": touched, "new_modules": sorted(set(new)),
        "web": getattr(mod, "WEB_DIRECTORY", None), "nodes": [n.__name__ for n in node_list],
    }}))
    """
)


def test_pack_import_is_quiet_offline_and_light() -> None:
    code = SCRIPT.format(tests=str(REPO_ROOT / "tests"), pack=PACK_NAME)
    env = apply_offline_env(dict(__import__("os").environ))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["stdout"] == "", report["stdout"]
    assert report["network"] == []
    assert not set(HEAVY) & set(report["new_modules"]), report["new_modules"]
    assert report["web"] == "./web"
    assert "MegaSRColorFix" in report["nodes"]
