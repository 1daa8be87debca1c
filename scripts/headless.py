"""Run a UI-format workflow JSON headlessly in the real ComfyUI (in-process) and write its output image.

    python scripts/headless.py workflows/megasr_color_fix.json --input photo.png --output out.png \
        [--set 3.mode=wavelet] [--set KSampler.seed=7] [--output-node 9] [--extra-model-paths-config FILE]
    python scripts/headless.py WORKFLOW.json --input photos/ --output results/     # batch: every image

(``bash scripts/run.sh --headless ...`` runs this after setup, with the offline environment.) The workflow
is converted to API format exactly as the frontend would (``scripts/comfyrun/workflow.py``) and executed by
ComfyUI's own ``PromptExecutor``. ``--input`` replaces the image of the LoadImage node titled "LR image"
(or of the only LoadImage); other images are read from ComfyUI's input folder (``--work-dir`` uses its own).
``--set`` takes ``NODE.INPUT=VALUE`` where NODE is a node id, a class type or a title, and VALUE is JSON
or a string.
Models come from the ComfyUI tree's ``models/`` folders, its ``extra_model_paths.yaml`` and any
``--extra-model-paths-config`` file.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LR_TITLE = "LR image"  # the title the shipped workflows give their LR Load Image node
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # the runner package; never the repo root (its nodes/ shadows ComfyUI's)

from comfyrun import runner as comfy  # noqa: E402
from comfyrun import workflow  # noqa: E402
from comfyrun.paths import comfy_dir  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", type=Path, help="UI-format workflow JSON (e.g. workflows/megasr_color_fix.json)")
    p.add_argument("--input", type=Path, help="the LR image, or a folder of images (batch)")
    p.add_argument("--output", type=Path, required=True, help="output PNG, or a folder when --input is one")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE")
    p.add_argument("--output-node", help="id of the output node to take the image from (default: the first)")
    p.add_argument("--extra-model-paths-config", type=Path, action="append", default=[])
    p.add_argument("--work-dir", type=Path, help="input/output/temp folders (default: a temporary folder)")
    p.add_argument("-v", "--verbose", action="store_true", help="show ComfyUI's info log lines")
    return p.parse_args(argv)


def input_nodes(prompt: dict, path: Path) -> list[str]:
    """The LoadImage node(s) ``--input`` replaces: those titled "LR image", else the only LoadImage."""
    titled = [nid for nid, n in prompt.items() if n["class_type"] == "LoadImage" and n["_meta"]["title"] == LR_TITLE]
    if titled:
        return titled
    loaders = workflow.find_nodes(prompt, "LoadImage")
    if len(loaders) == 1:
        return loaders
    if not loaders:
        raise SystemExit(f"--input given but {path} has no LoadImage node")
    raise SystemExit(
        f"{path} has {len(loaders)} LoadImage nodes and none is titled '{LR_TITLE}': "
        "choose with --set NODE.image=FILE instead of --input"
    )


def build_prompt(args: argparse.Namespace, object_info: dict, input_name: str | None) -> dict:
    prompt = workflow.to_api(workflow.load_workflow(args.workflow), object_info)
    overrides: dict[str, object] = {}
    if input_name is not None:
        overrides.update({f"{nid}.image": input_name for nid in input_nodes(prompt, args.workflow)})
    for item in args.overrides:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected NODE.INPUT=VALUE")
        key, value = item.split("=", 1)
        overrides[key] = workflow.parse_value(value)
    return workflow.set_inputs(prompt, overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if argv is None:  # as a command: ComfyUI's start-up chatter only with --verbose
        logging.basicConfig(format="%(message)s")
        logging.getLogger().setLevel(logging.INFO if args.verbose else logging.ERROR)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="megasr-headless-"))
    # Without --work-dir the images come from ComfyUI's own input folder, as in the UI.
    input_dir = work / "input" if args.work_dir else comfy_dir() / "input"
    output_dir = work / "output"
    input_dir.mkdir(parents=True, exist_ok=True)
    for example in (REPO_ROOT / "workflows" / "input").glob("*"):  # what the shipped workflows name
        if example.is_file() and not (input_dir / example.name).exists():
            shutil.copyfile(example, input_dir / example.name)
    runner = comfy.get_runner(input_dir=input_dir, output_dir=output_dir, temp_dir=work / "temp")

    import utils.extra_config

    configs = list(args.extra_model_paths_config)
    default_cfg = comfy_dir() / "extra_model_paths.yaml"
    if default_cfg.is_file():
        configs.insert(0, default_cfg)
    for cfg in configs:
        utils.extra_config.load_extra_path_config(str(cfg))

    if args.input is not None and args.input.is_dir():  # batch: every image in the folder
        sources = sorted(p for p in args.input.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not sources:
            raise SystemExit(f"--input {args.input}: no images ({', '.join(IMAGE_SUFFIXES)})")
        if args.output.suffix:
            raise SystemExit("with a folder as --input, --output must be a folder too")
        jobs = [(src, args.output / f"{src.stem}.png") for src in sources]
    elif args.input is not None:
        if not args.input.is_file():
            raise SystemExit(f"--input {args.input}: no such file")
        jobs = [(args.input, args.output)]
    else:
        jobs = [(None, args.output)]

    object_info = runner.object_info()
    for src, dest in jobs:
        input_name = None
        if src is not None:
            # A content-derived name, as an upload would get one: never overwrites another image.
            digest = hashlib.sha256(src.read_bytes()).hexdigest()[:10]
            input_name = f"{src.stem}_{digest}{src.suffix}"
            shutil.copyfile(src, input_dir / input_name)
        prompt = build_prompt(args, object_info, input_name)
        start = time.perf_counter()
        result = runner.run(prompt)
        images = result.images(args.output_node)
        if not images:
            raise SystemExit(f"the workflow produced no image (outputs: {sorted(result.outputs)})")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images[0], dest)
        print(f"wrote {dest} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
