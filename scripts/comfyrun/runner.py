"""The real ComfyUI 0.3.75, in-process: bootstrap, custom-node init, prompt execution, log checks.

Usage (no pytest needed)::

    from comfyrun import runner as comfy
    runner = comfy.get_runner(input_dir=..., output_dir=...)   # boots ComfyUI once per process
    result = runner.run(api_prompt)                            # validate_prompt + PromptExecutor
    result.images()                                            # paths of the SaveImage outputs

ComfyUI keeps global state (node registry, model folders, loaded models), so there is one runner per
process. Every run goes through ``execution.validate_prompt`` and ``execution.PromptExecutor``, exactly
as ComfyUI's own prompt worker does; the server object is a small recorder of the events the executor
would send to the frontend (``execution_start``, ``executing``, ``progress``, ``executed``,
``execution_error`` ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .paths import PACK_NAME, apply_offline_env, comfy_dir

log = logging.getLogger("megasr.runner")

#: Node id of the pack's always-present node; its absence means the pack failed to import.
PACK_SENTINEL_NODE = "MegaSRColorFix"

# ComfyUI's log lines about state-dict keys that did not fit (comfy/sd.py, model_base.py, controlnet.py):
# "clip missing: [...]", "unet unexpected: [...]", "Missing VAE keys [...]", "left over keys: [...]",
# "missing controlnet keys: [...]", "t2i missing [...]". A key that is silently missing leaves a weight
# uninitialised (NaN conditioning, black images), so tests treat any such line as a failure.
KEY_PROBLEM = re.compile(
    r"(?i)^\s*(?:clip|unet|t2i|vae)?\s*(?:missing|unexpected|left ?over)\b"
    r"|\b(?:missing|unexpected|left ?over)\b[^:\[]*\bkeys?\b"
)


class ComfyNotInstalled(RuntimeError):
    pass


class PromptInvalid(RuntimeError):
    """``execution.validate_prompt`` rejected the prompt."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any]) -> None:
        self.error = error
        self.node_errors = node_errors
        details = "; ".join(
            f"node {nid} ({info.get('class_type')}): "
            + ", ".join(f"{e.get('message')} [{e.get('details')}]" for e in info.get("errors", []))
            for nid, info in node_errors.items()
        )
        super().__init__(f"prompt invalid: {error.get('message')} {error.get('details', '')} {details}".strip())


class ExecutionFailed(RuntimeError):
    """The executor reported ``execution_error`` (or ``execution_interrupted``)."""

    def __init__(self, event: str, data: dict[str, Any]) -> None:
        self.event = event
        self.data = data
        self.node_type = data.get("node_type")
        self.exception_type = data.get("exception_type")
        self.exception_message = data.get("exception_message", "")
        tb = "".join(data.get("traceback", []) or [])
        super().__init__(
            f"{event} in node {data.get('node_id')} ({self.node_type}): "
            f"{self.exception_type}: {self.exception_message}\n{tb}"
        )


def bootstrap() -> Path:
    """Make the ComfyUI tree importable exactly as ``main.py`` would, on CPU. Idempotent; returns the tree.

    ``utils.extra_config`` is imported first: otherwise ``utils`` resolves to ``comfy/utils.py``.
    Command-line parsing stays disabled (defaults), then ``--cpu`` and ``--disable-api-nodes`` are set
    before ``comfy.model_management`` is imported.
    """
    apply_offline_env()
    root = comfy_dir()
    if not (root / "main.py").is_file():
        raise ComfyNotInstalled(f"no ComfyUI tree at {root}: run `bash scripts/setup.sh` first")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    loaded = sys.modules.get("nodes")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(root)):
        raise RuntimeError(
            f"a module named 'nodes' was imported from {getattr(loaded, '__file__', '?')} before ComfyUI's; "
            "never put the pack's repository root on sys.path"
        )
    import utils.extra_config  # noqa: F401  (must come before anything importing comfy.utils)
    from comfy.cli_args import args

    args.cpu = True
    args.disable_api_nodes = True
    return root


@contextlib.contextmanager
def capture_logs(level: int = logging.DEBUG) -> Iterator[list[logging.LogRecord]]:
    """Collect every log record (down to ``level``) emitted inside the block."""
    records: list[logging.LogRecord] = []

    class _Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = _Collector(level)
    root = logging.getLogger()
    old_level = root.level
    # Lowering the root level must not make the existing handlers print debug lines: pin them first.
    pinned = [(h, h.level) for h in root.handlers if h.level == logging.NOTSET]
    for h, _ in pinned:
        h.setLevel(root.getEffectiveLevel())
    root.addHandler(handler)
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for h, lvl in pinned:
            h.setLevel(lvl)


def key_problems(records: list[logging.LogRecord] | list[str]) -> list[str]:
    """Log messages that report missing/unexpected/left-over state-dict keys."""
    out = []
    for r in records:
        msg = r if isinstance(r, str) else r.getMessage()
        if KEY_PROBLEM.search(msg):
            out.append(msg[:500])
    return out


def assert_no_key_problems(records: list[logging.LogRecord] | list[str]) -> None:
    problems = key_problems(records)
    if problems:
        raise AssertionError("ComfyUI reported state-dict key problems:\n" + "\n".join(problems))


class ServerStub:
    """What ``PromptExecutor`` needs of ``server.PromptServer``; records every event it is sent."""

    def __init__(self, client_id: str = "megasr-tests") -> None:
        self.client_id: str | None = client_id
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict[str, Any] = {}
        self.messages: list[tuple[Any, Any]] = []

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict[str, Any]
    messages: list[tuple[Any, Any]]
    success: bool
    logs: list[logging.LogRecord] = field(default_factory=list)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [data for ev, data in self.messages if ev == name]

    def images(self, node_id: str | None = None) -> list[Path]:
        """Files listed under ``images`` in the UI outputs (SaveImage, PreviewImage), in order."""
        import folder_paths

        paths = []
        for nid, out in self.outputs.items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for item in out.get("images", []):
                base = folder_paths.get_directory_by_type(item.get("type", "output"))
                paths.append(Path(base) / item.get("subfolder", "") / item["filename"])
        return paths


def node_info(node_class: str) -> dict[str, Any]:
    """The ``/object_info`` entry of one node, computed from the same source the server uses.

    V3 nodes answer ``GET_NODE_INFO_V1()``; for V1 nodes the fields the frontend reads are rebuilt from
    ``INPUT_TYPES`` and the class attributes, as ``server.py`` does.
    """
    from comfy_api.internal import _ComfyNodeInternal

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node_class]
    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {section: list(spec.keys()) for section, spec in inputs.items()},
        "output": cls.RETURN_TYPES,
        "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
        "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
        "name": node_class,
        "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_class, node_class),
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
    }


def object_info(node_classes: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``/object_info`` for the given node types (all registered ones when None)."""
    import nodes

    names = list(nodes.NODE_CLASS_MAPPINGS) if node_classes is None else node_classes
    out = {}
    for name in names:
        if name in nodes.NODE_CLASS_MAPPINGS:
            out[name] = node_info(name)
    return out


def register_model_dir(folder_name: str, path: str | Path, first: bool = True) -> None:
    """Add ``path`` to a ComfyUI model folder (``checkpoints``, ``megasr``, ...) without touching the tree."""
    import folder_paths

    path = str(Path(path).resolve())
    Path(path).mkdir(parents=True, exist_ok=True)
    if folder_name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[folder_name] = ([path], set(folder_paths.supported_pt_extensions))
    else:
        folder_paths.add_model_folder_path(folder_name, path, is_default=first)


class ComfyRunner:
    """One booted ComfyUI per process, running API-format prompts through the real executor."""

    def __init__(self) -> None:
        bootstrap()
        import execution

        import nodes

        with capture_logs(logging.INFO) as records:
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.init_logs = records
        if PACK_SENTINEL_NODE not in nodes.NODE_CLASS_MAPPINGS:
            msgs = "\n".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)
            raise RuntimeError(f"{PACK_NAME} did not load into ComfyUI (no {PACK_SENTINEL_NODE}):\n{msgs}")
        self.server = ServerStub()
        self._install_progress_hook()
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0}
        )

    def _install_progress_hook(self) -> None:
        """Forward ``comfy.utils.ProgressBar`` updates as the server does: a ``progress`` event, the
        progress registry, and the interruption check that makes Cancel work within a step."""
        import comfy.model_management
        import comfy.utils
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context

        server = self.server

        def hook(value, total, preview_image, prompt_id=None, node_id=None):  # noqa: ANN001, ANN202
            ctx = get_executing_context()
            prompt_id = prompt_id or (ctx.prompt_id if ctx is not None else None) or server.last_prompt_id
            node_id = node_id or (ctx.node_id if ctx is not None else None) or server.last_node_id
            comfy.model_management.throw_exception_if_processing_interrupted()
            get_progress_state().update_progress(node_id, value, total, preview_image)
            server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id})
            if preview_image is not None:
                server.send_sync("preview", {"prompt_id": prompt_id, "node": node_id, "image": preview_image})

        comfy.utils.set_progress_bar_global_hook(hook)

    def interrupt(self) -> None:
        """What the Cancel button does: ask the running prompt to stop at the next check."""
        import comfy.model_management

        comfy.model_management.interrupt_current_processing(True)

    # --- folders ---------------------------------------------------------------------------------
    def set_dirs(
        self,
        input_dir: str | Path | None = None,
        output_dir: str | Path | None = None,
        temp_dir: str | Path | None = None,
    ) -> None:
        """Point ComfyUI at other input/output/temp folders.

        Node objects cached by the executor keep the folder they were created with (``SaveImage`` stores
        its output folder), so a real change also resets the executor's caches.
        """
        import folder_paths

        changed = False
        for value, getter, setter in (
            (input_dir, folder_paths.get_input_directory, folder_paths.set_input_directory),
            (output_dir, folder_paths.get_output_directory, folder_paths.set_output_directory),
            (temp_dir, folder_paths.get_temp_directory, folder_paths.set_temp_directory),
        ):
            if value is None:
                continue
            Path(value).mkdir(parents=True, exist_ok=True)
            if Path(getter()).resolve() != Path(value).resolve():
                setter(str(value))
                changed = True
        if changed and hasattr(self, "executor"):
            self.executor.reset()

    register_model_dir = staticmethod(register_model_dir)
    object_info = staticmethod(object_info)
    node_info = staticmethod(node_info)

    # --- running ---------------------------------------------------------------------------------
    def validate(self, prompt: dict[str, Any], prompt_id: str = "validate") -> list[str]:
        """Validate like ``POST /prompt`` does; returns the output node ids to execute."""
        import execution

        ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not ok:
            raise PromptInvalid(error or {}, node_errors or {})
        return outputs

    def run(
        self,
        prompt: dict[str, Any],
        *,
        prompt_id: str | None = None,
        extra_data: dict[str, Any] | None = None,
        raise_on_error: bool = True,
        check_keys: bool = True,
    ) -> RunResult:
        """Validate and execute an API-format prompt; raises ``ExecutionFailed`` on a node error."""
        prompt = copy.deepcopy(prompt)
        prompt_id = prompt_id or str(uuid.uuid4())
        outputs = self.validate(prompt, prompt_id)
        self.server.messages = []
        self.server.last_prompt_id = prompt_id
        extra = {"client_id": self.server.client_id, **(extra_data or {})}
        with capture_logs() as records:
            self.executor.execute(prompt, prompt_id, extra, outputs)
        hist = getattr(self.executor, "history_result", None) or {}
        result = RunResult(
            prompt_id=prompt_id,
            outputs=dict(hist.get("outputs", {})),
            messages=list(self.server.messages),
            success=bool(self.executor.success),
            logs=records,
        )
        if raise_on_error and not result.success:
            for ev in ("execution_error", "execution_interrupted"):
                found = result.events(ev)
                if found:
                    raise ExecutionFailed(ev, found[-1])
            raise ExecutionFailed("execution_error", {"exception_message": "executor reported failure"})
        if check_keys:
            assert_no_key_problems(records)
        return result


_RUNNER: ComfyRunner | None = None


def get_runner(
    input_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    temp_dir: str | Path | None = None,
) -> ComfyRunner:
    """The process-wide runner (booted on first use); sets the given input/output/temp folders."""
    global _RUNNER
    if _RUNNER is None:
        _RUNNER = ComfyRunner()
    _RUNNER.set_dirs(input_dir, output_dir, temp_dir)
    return _RUNNER
