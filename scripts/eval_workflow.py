"""``python -m megasr eval`` with a ComfyUI workflow as the upscaler: every test image goes through the workflow in
the real ComfyUI (in-process, the headless runner of ``scripts/headless.py``), i.e. the very sampling code the
nodes run, and is scored by ``megasr/evaluate.py`` (same report, resume, skips and no-overwrite rules).

    python scripts/eval_workflow.py workflows/megasr_x4.json --test RealSRVal_crop128 --output eval/megasr \
        [--set MegaSRSampler.steps=50] [--seed 0] [--metrics psnr,ssim,lpips] [--crop-border 0] [--force]

The LR image goes into the LoadImage titled "LR image" (or the only LoadImage); the result is the image output
fed by the MegaSR Sampler (``--output-node`` picks another). Each image's seed (``seed + crc32(name)``) is set on
every node input named ``seed`` / ``noise_seed`` (MegaSR Sampler, KSampler ...). The report's method is
``workflow:<file name>`` plus the ``--set`` overrides. Exit status: 0 done, 2 a user error.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED_INPUTS = ("seed", "noise_seed")


def _headless():  # noqa: ANN202 - the sibling script as a module (it sets sys.path for comfyrun and megasr)
    spec = importlib.util.spec_from_file_location("megasr_headless", REPO_ROOT / "scripts" / "headless.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("megasr_headless", module)
    spec.loader.exec_module(module)
    return sys.modules["megasr_headless"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    headless = _headless()
    from megasr.evaluate import add_eval_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", type=Path, help="UI-format workflow JSON (e.g. workflows/megasr_x4.json)")
    add_eval_arguments(p)
    p.set_defaults(method=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE")
    p.add_argument("--output-node", help="id or title of the output node to take the image from")
    p.add_argument("--extra-model-paths-config", type=Path, action="append", default=[])
    p.add_argument("--work-dir", type=Path, help="ComfyUI input/output/temp folders (default: a temporary folder)")
    p.add_argument("--models-dir", type=Path, help="models folder holding megasr/metrics (learned metric weights)")
    args = p.parse_args(argv)
    args.headless = headless
    return args


def workflow_upscaler(args: argparse.Namespace):  # noqa: ANN201 - an ``Upscaler``
    """(LR [1, 3, h, w], seed) -> the workflow's result image [1, 3, H, W], run through ComfyUI's executor."""
    import numpy as np
    import torch
    from PIL import Image

    h = args.headless
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="megasr-eval-"))
    args.work_dir = work
    runner, input_dir = h._setup(args, work)
    object_info = runner.object_info()
    probe = h.build_prompt(args, object_info, None)
    result_id = h.result_node(probe, args.output_node)
    seed_keys = [f"{nid}.{k}" for nid, n in probe.items() for k in n["inputs"] if k in SEED_INPUTS]
    counter = {"n": 0}

    def up(lr: torch.Tensor, seed: int) -> torch.Tensor:
        counter["n"] += 1
        name = f"megasr_eval_lr_{counter['n']}.png"
        arr = (lr[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(input_dir / name)
        prompt = h.build_prompt(args, object_info, name)
        prompt = h.workflow.set_inputs(prompt, dict.fromkeys(seed_keys, seed))
        try:
            result = runner.run(prompt)
        except h.comfy.ExecutionFailed as e:
            raise h.UserError(h._node_error(e)) from None
        images = result.images(result_id)
        if not images:
            raise h.UserError(f"{h._label(prompt, result_id)} produced no image")
        with Image.open(images[0]) as im:
            out = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(out.copy()).permute(2, 0, 1)[None]

    return up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megasr.evaluate import (
        EvalError,
        EvalSettings,
        default_metric_folders,
        discover,
        markdown_report,
        run_eval,
    )
    from megasr.metrics import METRICS

    log = logging.getLogger("megasr")
    if argv is None:
        logging.basicConfig(format="%(message)s", level=logging.INFO)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        print(f"error: unknown metric(s) {', '.join(unknown)} (known: {', '.join(METRICS)})", file=sys.stderr)
        return 2
    method = "workflow:" + args.workflow.name + "".join(f" {o}" for o in args.overrides)
    settings = EvalSettings(method, args.scale, args.seed, metrics, args.crop_border, args.size_rule)
    try:
        sets = [discover(f) for f in args.test]
        summary = run_eval(
            sets, workflow_upscaler(args), settings, args.output, default_metric_folders(args.models_dir), args.force
        )
    except (EvalError, args.headless.UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("%s", markdown_report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
