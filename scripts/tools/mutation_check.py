"""Mutation check: apply deliberate faults to megasr/, nodes/ and training/ and report which tests catch each.

    .venv/bin/python scripts/tools/mutation_check.py                # every fault (about 15-25 min on 2 cores)
    .venv/bin/python scripts/tools/mutation_check.py --only hint_scale,gate --keep   # some faults; keep the copy

Each fault is a literal text substitution in one file. The check runs in a private copy of the repository
(with its own ComfyUI tree linking the copy, the shared venv and fixture cache), so the working tree is
never touched. A fault passes when at least one of its tests fails; a fault whose text is no longer in the
code is reported as STALE (the code moved on: update the fault). Exit status 1 if any fault survives or is
stale. Run by hand (or in CI when cheap); the table goes into the closing note of a change that touches
the method.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Fault:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


def _faults() -> tuple[Fault, ...]:
    from mutation_faults import FAULTS  # the list, kept apart from the machinery

    return tuple(Fault(**f) for f in FAULTS)


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    for rel in files.stdout.splitlines():
        src = ROOT / rel
        if not src.is_file():
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
    os.symlink(os.path.realpath(ROOT / ".venv"), dest / ".venv")
    comfy = dest / ".comfyui"
    shutil.copytree(ROOT / ".comfyui", comfy, symlinks=True)
    link = comfy / "ComfyUI" / "custom_nodes" / "ComfyUI-MegaSR"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(dest)
    node_modules = ROOT / "tests" / "browser" / "node_modules"
    if node_modules.is_dir():
        os.symlink(node_modules, dest / "tests" / "browser" / "node_modules")


def _run_tests(repo: Path, tests: tuple[str, ...], timeout: int) -> tuple[bool, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        # the fixtures are generated from the code, so a faulty copy gets its own cache next to it
        "MEGASR_FIXTURE_CACHE": str(repo / ".cache" / "fixtures"),
    }
    env.pop("COMFYUI_DIR", None)
    cmd = [str(repo / ".venv" / "bin" / "python"), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, "timeout (counted as caught)"
    last = (p.stdout.strip().splitlines() or [""])[-1]
    return p.returncode != 0, last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated fault names")
    ap.add_argument("--keep", action="store_true", help="keep the private copy (its path is printed)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # mutation_faults, beside this file
    faults = _faults()
    if args.only:
        wanted = set(args.only.split(","))
        faults = tuple(f for f in faults if f.name in wanted)
    if args.list:
        for f in faults:
            print(f"{f.name:28s} {f.file:32s} {f.what}")
        return 0
    repo = Path(tempfile.mkdtemp(prefix="megasr_mutation_"))
    _copy_repo(repo)
    shared_cache = ROOT / ".cache" / "fixtures" / "models" / "checkpoints"
    if shared_cache.is_dir():  # the SD-2 checkpoints do not depend on the pack's code: share them
        (repo / ".cache" / "fixtures" / "models").mkdir(parents=True)
        shutil.copytree(shared_cache, repo / ".cache" / "fixtures" / "models" / "checkpoints", copy_function=os.link)
    print(f"private copy: {repo}", flush=True)
    print("baseline (no fault) ...", flush=True)
    all_tests = tuple(sorted({t for f in faults for t in f.tests}))
    failed, last = _run_tests(repo, all_tests, args.timeout * 2)
    if failed:
        print(f"the tests fail without any fault: {last}")
        return 2
    rows = []
    for f in faults:
        path = repo / f.file
        text = path.read_text()
        n = text.count(f.old)
        if n != 1:
            rows.append((f, "STALE", f"fault text found {n} times"))
            continue
        path.write_text(text.replace(f.old, f.new))
        try:
            caught, last = _run_tests(repo, f.tests, args.timeout)
        finally:
            path.write_text(text)
        rows.append((f, "caught" if caught else "SURVIVED", last))
        print(f"  {f.name}: {rows[-1][1]} ({last})", flush=True)
    print()
    print("| fault | file | what it breaks | result | tests |")
    print("|---|---|---|---|---|")
    for f, result, _ in rows:
        print(f"| {f.name} | {f.file} | {f.what} | {result} | {', '.join(t.split('::')[-1] for t in f.tests)} |")
    if not args.keep:
        shutil.rmtree(repo, ignore_errors=True)
    return 0 if all(r == "caught" for _, r, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
