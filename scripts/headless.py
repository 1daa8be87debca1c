"""Run a UI-format workflow JSON headlessly in the real ComfyUI (in-process) and write its result image.

    python scripts/headless.py workflows/megasr_x4.json --input photo.png --output out.png \
        [--set 3.mode=wavelet] [--set KSampler.seed=7] [--output-node 9] [--extra-model-paths-config FILE]
    python scripts/headless.py WORKFLOW.json --input photos/ --output results/     # batch: every image

(``bash scripts/run.sh --headless ...`` runs this after setup, with the offline environment.) The workflow
is converted to API format exactly as the frontend would (``scripts/comfyrun/workflow.py``) and executed by
ComfyUI's own ``PromptExecutor``. ``--input`` replaces the image of the LoadImage node titled "LR image"
(or of the only LoadImage); other images are read from ComfyUI's input folder (``--work-dir`` uses its own).
``--set`` takes ``NODE.INPUT=VALUE`` where NODE is a node id, a class type or a title, and VALUE is JSON
or a string. Models come from the ComfyUI tree's ``models/`` folders, its ``extra_model_paths.yaml`` and any
``--extra-model-paths-config`` file.

What is written: the image of the output node fed by the MegaSR Sampler (``--output-node`` picks another;
a workflow without a sampler needs it when it has several image outputs), never a map preview. Before any
work every file the graph names is looked up and all missing ones are listed at once with their folder and
source (``megasr/manifest.json``); the sampler's peak memory is estimated (``megasr.memory``) and an output
that cannot fit is refused. Nothing is written onto an input file or onto an existing file (unless
``--overwrite``); in a batch, inputs with the same stem get distinct names (``photo_png.png``,
``photo_jpg.png``) and an output folder equal to or inside the input folder is refused unless
``--output-in-input``.

Exit status: 130 / 143 stopped by SIGINT / SIGTERM after the current image (what was written and what was not is
listed); 0 done; 2 a user error, nothing done (bad arguments, missing files, an invalid graph, a node
that refused its input, an output that would overwrite); 3 a batch where some images were skipped or failed
(each is listed); 1 an unexpected error (traceback with ``-v``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LR_TITLE = "LR image"  # the title the shipped workflows give their LR Load Image node
SAMPLER = "MegaSRSampler"
IMAGE_OUTPUTS = ("SaveImage", "PreviewImage")
EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_PARTIAL = 0, 1, 2, 3
#: a batch stopped by a signal exits 128 + its number, as a shell reports it (SIGINT 130, SIGTERM 143)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # the runner package; never the repo root (its nodes/ shadows ComfyUI's)

from comfyrun import runner as comfy  # noqa: E402
from comfyrun import workflow  # noqa: E402
from comfyrun.paths import comfy_dir  # noqa: E402

if str(REPO_ROOT) not in sys.path:
    # for the pack's pure-torch ``megasr`` package (manifest, memory estimate); last, so ComfyUI's ``nodes``
    # (its tree goes first) is never shadowed by the pack's
    sys.path.append(str(REPO_ROOT))

#: node type -> (input, ComfyUI folder) of the files it reads; checked before any work
FILE_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "CheckpointLoaderSimple": (("ckpt_name", "checkpoints"),),
    "CLIPVisionLoader": (("clip_name", "clip_vision"),),
    "VAELoader": (("vae_name", "vae"),),
    "ControlNetLoader": (("control_net_name", "controlnet"),),
    "LoraLoader": (("lora_name", "loras"),),
    "MegaSRModelLoader": (("megasr_name", "megasr"),),
    "MegaSRDageLoader": (("dage_name", "megasr"), ("base_name", "megasr")),
}
NO_FILE = ("none", "")
#: node type -> input -> position in a UI workflow's ``widgets_values`` (for the check before ComfyUI boots)
WIDGET_POSITIONS: dict[str, dict[str, int]] = {
    "CheckpointLoaderSimple": {"ckpt_name": 0},
    "CLIPVisionLoader": {"clip_name": 0},
    "VAELoader": {"vae_name": 0},
    "ControlNetLoader": {"control_net_name": 0},
    "LoraLoader": {"lora_name": 0},
    "MegaSRModelLoader": {"megasr_name": 0},
    "MegaSRDageLoader": {"dage_name": 1, "base_name": 2, "download_missing": 3},
}


class UserError(Exception):
    """A problem the user can fix; printed without a traceback, exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", type=Path, help="UI-format workflow JSON (e.g. workflows/megasr_color_fix.json)")
    p.add_argument("--input", type=Path, help="the LR image, or a folder of images (batch)")
    p.add_argument("--output", type=Path, required=True, help="output PNG, or a folder when --input is one")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE")
    p.add_argument("--output-node", help="id or title of the output node to take the image from")
    p.add_argument("--overwrite", "--force", action="store_true", help="replace existing output files")
    p.add_argument(
        "--output-in-input", action="store_true", help="allow an output folder equal to or inside the input folder"
    )
    p.add_argument("--extra-model-paths-config", type=Path, action="append", default=[])
    p.add_argument("--work-dir", type=Path, help="input/output/temp folders (default: a temporary folder)")
    p.add_argument("-v", "--verbose", action="store_true", help="show ComfyUI's info log lines and tracebacks")
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
        raise UserError(f"--input given but {path} has no LoadImage node")
    raise UserError(
        f"{path} has {len(loaders)} LoadImage nodes and none is titled '{LR_TITLE}': "
        "choose with --set NODE.image=FILE instead of --input"
    )


def build_prompt(args: argparse.Namespace, object_info: dict, input_name: str | None) -> dict:
    try:
        prompt = workflow.to_api(workflow.load_workflow(args.workflow), object_info)
    except (OSError, ValueError) as e:
        raise UserError(f"{args.workflow}: {e}") from None
    overrides: dict[str, object] = {}
    if input_name is not None:
        overrides.update({f"{nid}.image": input_name for nid in input_nodes(prompt, args.workflow)})
    for item in args.overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected NODE.INPUT=VALUE")
        key, value = item.split("=", 1)
        overrides[key] = workflow.parse_value(value)
    try:
        return workflow.set_inputs(prompt, overrides)
    except workflow.WorkflowError as e:
        raise UserError(f"--set: {e}") from None


def _label(prompt: dict, nid: str) -> str:
    return f"node {nid} ({prompt[nid]['_meta'].get('title') or prompt[nid]['class_type']})"


def _upstream(prompt: dict, nid: str) -> set[str]:
    seen: set[str] = set()
    todo = [nid]
    while todo:
        for v in prompt[todo.pop()]["inputs"].values():
            if isinstance(v, list) and len(v) == 2 and str(v[0]) in prompt and str(v[0]) not in seen:
                seen.add(str(v[0]))
                todo.append(str(v[0]))
    return seen


def result_node(prompt: dict, explicit: str | None = None) -> str:
    """The output node whose image is the workflow's result: ``explicit`` (id or title), else the image output
    fed by the MegaSR Sampler (directly first, then through other nodes), else the only image output."""
    outputs = [nid for nid, n in prompt.items() if n["class_type"] in IMAGE_OUTPUTS]
    if explicit is not None:
        found = [nid for nid in outputs if nid == explicit or prompt[nid]["_meta"].get("title") == explicit]
        if len(found) != 1:
            raise UserError(
                f"--output-node {explicit}: not one image output node of the workflow "
                f"(there are: {', '.join(_label(prompt, n) for n in outputs) or 'none'})"
            )
        return found[0]
    if not outputs:
        raise UserError("the workflow has no Save Image / Preview Image node to take the result from")
    samplers = {nid for nid, n in prompt.items() if n["class_type"] == SAMPLER}
    direct = [nid for nid in outputs if str(prompt[nid]["inputs"].get("images", [None])[0]) in samplers]
    fed = direct or [nid for nid in outputs if _upstream(prompt, nid) & samplers]
    if len(fed) == 1:
        return fed[0]
    candidates = fed or outputs
    if len(candidates) == 1:
        return candidates[0]
    raise UserError(
        "the workflow has several image outputs and none is singled out by the MegaSR Sampler: "
        f"choose one with --output-node ({', '.join(_label(prompt, n) for n in candidates)})"
    )


def missing_files(prompt: dict) -> list[str]:
    """Every file the graph names that ComfyUI cannot find, with its folder and where to get it."""
    import folder_paths

    from megasr.manifest import describe_missing, find_file

    problems = []
    for nid, node in prompt.items():
        for name, folder in FILE_INPUTS.get(node["class_type"], ()):
            value = node["inputs"].get(name)
            if not isinstance(value, str) or value in NO_FILE:
                continue
            found = find_file(folder, value)
            if node["inputs"].get("download_missing") is True and found is not None and found[0].public:
                continue  # the loader downloads it when it runs (its own validation reports offline mode)
            if folder not in folder_paths.folder_names_and_paths or folder_paths.get_full_path(folder, value) is None:
                searched = (
                    folder_paths.get_folder_paths(folder) if folder in folder_paths.folder_names_and_paths else []
                )
                problems.append(f"{_label(prompt, nid)}, input '{name}': {describe_missing(folder, value, searched)}")
        if node["class_type"] == "LoadImage":
            value = node["inputs"].get("image")
            if isinstance(value, str) and not Path(folder_paths.get_annotated_filepath(value)).is_file():
                problems.append(
                    f"{_label(prompt, nid)}, input 'image': '{value}' is not in ComfyUI's input folder "
                    f"{folder_paths.get_input_directory()} (give the LR image with --input)"
                )
    return problems


def memory_problem(prompt: dict, lr_path: Path | None) -> str | None:
    """The sampler's size/memory preflight (``megasr.memory``) for the LR image given with ``--input``."""
    if lr_path is None:
        return None
    import comfy.model_management as mm
    from PIL import Image

    from megasr.memory import estimate_sampler_peak_bytes

    try:
        with Image.open(lr_path) as im:
            w, h = im.size
    except OSError as e:
        raise UserError(f"--input {lr_path}: not a readable image ({e})") from None
    available = mm.get_free_memory(mm.get_torch_device())
    for nid, node in prompt.items():
        if node["class_type"] != SAMPLER:
            continue
        inp = node["inputs"]
        numbers = {
            k: inp[k]
            for k in ("scale", "tile_size", "tile_overlap", "tile_batch")
            if isinstance(inp.get(k), int | float)
        }
        scale = float(numbers.get("scale", 4.0))
        tile = int(numbers.get("tile_size", 1024))
        vae_tile = max(512, tile)
        big = (h * scale) * (w * scale) > 4 * vae_tile * vae_tile
        est = estimate_sampler_peak_bytes(
            (h, w),
            scale,
            tile_size=tile,
            tile_overlap=int(numbers.get("tile_overlap", 128)),
            tile_batch=int(numbers.get("tile_batch", 1)),
            dtype=mm.unet_dtype(),
            vae_tile=vae_tile if big else None,
        )
        if est.peak > available:
            gib = 1024**3
            return (
                f"{_label(prompt, nid)}: {lr_path.name} ({w}x{h}) at x{scale:g} would need about "
                f"{est.peak / gib:.1f} GiB but {available / gib:.1f} GiB are free ({est.describe()}); "
                f"lower --set {nid}.scale=... or give a smaller image"
            )
    return None


def plan_jobs(args: argparse.Namespace) -> tuple[list[tuple[Path | None, Path]], list[str]]:
    """(source, destination) pairs and the skipped ones (with why): never an input file, never an existing file
    without --overwrite, never two results onto one name."""
    skipped: list[str] = []
    if args.input is not None and args.input.is_dir():
        sources = sorted(p for p in args.input.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not sources:
            raise UserError(f"--input {args.input}: no images ({', '.join(IMAGE_SUFFIXES)})")
        if args.output.suffix.lower() in IMAGE_SUFFIXES:
            raise UserError("with a folder as --input, --output must be a folder too")
        out, inp = args.output.resolve(), args.input.resolve()
        if (out == inp or inp in out.parents) and not args.output_in_input:
            raise UserError(
                f"--output {args.output} is {'the input folder' if out == inp else 'inside the input folder'} "
                f"{args.input}: results would mix with (and could overwrite) the originals. Choose another folder "
                "or pass --output-in-input"
            )
        stems: dict[str, int] = {}
        for src in sources:
            stems[src.stem] = stems.get(src.stem, 0) + 1
        inputs = {s.resolve() for s in sources}
        jobs: list[tuple[Path | None, Path]] = []
        taken: dict[Path, Path] = {}
        for src in sources:
            name = src.stem if stems[src.stem] == 1 else f"{src.stem}_{src.suffix.lstrip('.').lower()}"
            dest = args.output / f"{name}.png"
            key = dest.resolve()
            if key in inputs:
                skipped.append(f"{src}: its result {dest} would overwrite an input image")
            elif key in taken:
                skipped.append(f"{src}: its result {dest} would overwrite the result of {taken[key]}")
            elif dest.exists() and not args.overwrite:
                skipped.append(f"{src}: {dest} exists (pass --overwrite to replace it)")
            else:
                taken[key] = src
                jobs.append((src, dest))
        return jobs, skipped
    if args.input is not None and not args.input.is_file():
        raise UserError(f"--input {args.input}: no such file or folder")
    if args.input is not None and args.output.resolve() == args.input.resolve():
        raise UserError(f"--output {args.output} is the input image: it is never overwritten")
    if args.output.is_dir():
        raise UserError(f"--output {args.output} is a folder; give a file name (e.g. {args.output}/result.png)")
    if args.output.exists() and not args.overwrite:
        raise UserError(f"--output {args.output} exists; pass --overwrite to replace it")
    return [(args.input, args.output)], skipped


def _node_error(e: comfy.ExecutionFailed) -> str:
    return f"{e.node_type} (node {e.data.get('node_id')}) failed: {e.exception_type}: {e.exception_message}"


def _user_exception(e: comfy.ExecutionFailed) -> bool:
    """A node's refusal of its input (MegaSRInputError, WeightFileError, ComfyUI's own ValueErrors)."""
    return (e.exception_type or "").rsplit(".", 1)[-1] in ("MegaSRInputError", "WeightFileError", "ValueError")


def files_named_in_file(workflow_path: Path, overrides: list[str]) -> dict:
    """The loader nodes of the workflow file as a small API-format prompt, read without ComfyUI's node definitions
    (UI format: the widget positions of ``WIDGET_POSITIONS``; nodes inside subgraphs and nodes an override touches
    are left to the full check after boot)."""
    import json

    data = json.loads(workflow_path.read_text(encoding="utf-8"))
    touched = {item.split("=", 1)[0].rsplit(".", 1)[0] for item in overrides}
    prompt: dict = {}
    if isinstance(data.get("nodes"), list):  # UI format
        for n in data["nodes"]:
            positions = WIDGET_POSITIONS.get(n.get("type"))
            widgets = n.get("widgets_values")
            if not positions or not isinstance(widgets, list):
                continue
            inputs = {k: widgets[i] for k, i in positions.items() if i < len(widgets)}
            title = n.get("title") or n["type"]
            prompt[str(n.get("id"))] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": title}}
    else:  # API format
        prompt = {k: v for k, v in data.items() if isinstance(v, dict) and v.get("class_type") in FILE_INPUTS}
    return {
        k: v
        for k, v in prompt.items()
        if k not in touched and v.get("_meta", {}).get("title") not in touched and v["class_type"] in FILE_INPUTS
    }


def _model_path_configs(args: argparse.Namespace) -> None:
    import utils.extra_config

    configs = list(args.extra_model_paths_config)
    default_cfg = comfy_dir() / "extra_model_paths.yaml"
    if default_cfg.is_file():
        configs.insert(0, default_cfg)
    for cfg in configs:
        if not cfg.is_file():
            raise UserError(f"--extra-model-paths-config {cfg}: no such file")
        utils.extra_config.load_extra_path_config(str(cfg))


def check_files_before_boot(args: argparse.Namespace) -> None:
    """Missing model files named in the workflow file, listed before ComfyUI boots (which takes most of a minute
    on a small machine); the full check after boot covers what this reading cannot see."""
    comfy.bootstrap()  # the tree importable: folder_paths, no node is loaded
    _model_path_configs(args)
    problems = missing_files(files_named_in_file(args.workflow, list(args.overrides)))
    if problems:
        raise UserError(
            f"{args.workflow.name}: {len(problems)} file(s) missing, nothing was run:\n  - " + "\n  - ".join(problems)
        )


def _setup(args: argparse.Namespace, work: Path) -> tuple[comfy.ComfyRunner, Path]:
    # Without --work-dir the images come from ComfyUI's own input folder, as in the UI.
    input_dir = work / "input" if args.work_dir else comfy_dir() / "input"
    input_dir.mkdir(parents=True, exist_ok=True)
    for example in (REPO_ROOT / "workflows" / "input").glob("*"):  # what the shipped workflows name
        if example.is_file() and not (input_dir / example.name).exists():
            shutil.copyfile(example, input_dir / example.name)
    runner = comfy.get_runner(input_dir=input_dir, output_dir=work / "output", temp_dir=work / "temp")
    _model_path_configs(args)
    return runner, input_dir


class _StopAfterImage:
    """SIGINT/SIGTERM set a flag the batch checks after each image (the image being made is finished and written
    whole); a second signal stops at once (the default action), the half-written file removed by ``run``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after the current image (again to stop now)", file=sys.stderr)
        for s, old in self._old.items():
            signal.signal(s, old)

    def __enter__(self) -> _StopAfterImage:
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            for s in STOP_SIGNALS:
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def run(args: argparse.Namespace) -> int:
    own_work = args.work_dir is None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="megasr-headless-"))
    try:
        with _StopAfterImage() as stop:
            return _run(args, work, stop)
    finally:
        if own_work:  # the run's own temp folder (inputs copied, ComfyUI's output/temp): nothing of it is needed
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, stop: _StopAfterImage) -> int:
    jobs, skipped = plan_jobs(args)
    check_files_before_boot(args)
    runner, input_dir = _setup(args, work)
    object_info = runner.object_info()
    prompt = build_prompt(args, object_info, None)
    result_id = result_node(prompt, args.output_node)
    replaced = set(input_nodes(prompt, args.workflow)) if jobs and jobs[0][0] is not None else set()
    problems = missing_files({k: v for k, v in prompt.items() if k not in replaced})
    if problems:
        raise UserError(
            f"{args.workflow.name}: {len(problems)} file(s) missing, nothing was run:\n  - " + "\n  - ".join(problems)
        )
    failed: list[str] = []
    single = len(jobs) == 1 and not skipped and not (args.input is not None and args.input.is_dir())
    written: list[Path] = []
    for n, (src, dest) in enumerate(jobs):
        if stop.signum is not None:
            name = signal.Signals(stop.signum).name
            print(f"stopped by {name}: {len(written)} of {len(jobs)} image(s) written", file=sys.stderr)
            for d in written:
                print(f"  written     {d}", file=sys.stderr)
            for _, d in jobs[n:]:
                print(f"  not written {d}", file=sys.stderr)
            return 128 + stop.signum
        input_name = None
        if src is not None:
            # A content-derived name, as an upload would get one: never overwrites another image.
            digest = hashlib.sha256(src.read_bytes()).hexdigest()[:10]
            input_name = f"{src.stem}_{digest}{src.suffix}"
            shutil.copyfile(src, input_dir / input_name)
        prompt = build_prompt(args, object_info, input_name)
        start = time.perf_counter()
        try:
            too_big = memory_problem(prompt, src)
            if too_big:
                raise UserError(too_big)
            try:
                result = runner.run(prompt)
            except comfy.PromptInvalid as e:
                raise UserError(f"the workflow does not validate: {e}") from None
            except comfy.ExecutionFailed as e:
                if not _user_exception(e):
                    raise
                raise UserError(_node_error(e)) from None
        except UserError as e:
            if single:
                raise
            failed.append(f"{src}: {e}")
            print(f"failed {src}: {e}", file=sys.stderr)
            continue
        images = result.images(result_id)
        if not images:
            raise UserError(f"{_label(prompt, result_id)} produced no image (outputs: {sorted(result.outputs)})")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        try:
            shutil.copyfile(images[0], tmp)
            tmp.replace(dest)  # whole or not at all
        finally:
            tmp.unlink(missing_ok=True)  # a second Ctrl-C mid-copy leaves no half-written file
        written.append(dest)
        print(f"wrote {dest} ({time.perf_counter() - start:.1f}s)", flush=True)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if skipped or failed:
        print(f"{len(skipped)} skipped, {len(failed)} failed, {len(jobs) - len(failed)} written", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if argv is None:  # as a command: ComfyUI's start-up chatter only with --verbose
        logging.basicConfig(format="%(message)s")
        logging.getLogger().setLevel(logging.INFO if args.verbose else logging.ERROR)
    try:
        return run(args)
    except KeyboardInterrupt:  # the second Ctrl-C: stopped at once; the current image was not written
        print("stopped at once (second signal): the current image was not written", file=sys.stderr)
        return 128 + signal.SIGINT
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER
    except comfy.ExecutionFailed as e:
        print(f"error: {_node_error(e)}", file=sys.stderr)
        if args.verbose:
            print("".join(e.data.get("traceback", []) or []), file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as e:  # noqa: BLE001 - the command's last word: one line, the traceback with -v
        print(f"error: unexpected {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
