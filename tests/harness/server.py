"""The real ComfyUI server as a child process on a free loopback port: HTTP + WebSocket helpers.

::

    with ComfyServer(work_dir, model_paths=fixture_model_paths(cache_dir())) as srv:     # python main.py --cpu ... --port <free>
        info = srv.object_info()
        pid = srv.queue(api_prompt)                          # POST /prompt
        entry = srv.wait(pid)                                # polls /history/<id>
        srv.events(pid)                                      # what /ws sent for that prompt

The server gets its own input/output/temp/user folders and an ``extra_model_paths.yaml`` that points at
the fixture cache, so nothing is written into the ComfyUI tree. It is stopped by its own PID.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from .paths import REPO_ROOT, apply_offline_env, comfy_dir
from .procs import preexec

log = logging.getLogger("megasr.harness")

MODEL_FOLDERS = ("checkpoints", "megasr", "clip_vision", "controlnet", "vae", "loras")


def fixture_model_paths(root: Path) -> dict[str, list[Path]]:
    """Model folders the fixtures may fill: ``<cache>/models/<folder>`` and ``<cache>/<folder>``."""
    paths = {folder: [root / "models" / folder, root / folder] for folder in MODEL_FOLDERS}
    paths["megasr"].append(root / "dage")
    return paths


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_extra_model_paths(path: Path, folders: dict[str, list[Path]], name: str = "megasr_fixtures") -> Path:
    """An ``extra_model_paths.yaml`` giving each ComfyUI model folder the listed directories."""
    lines = [f"{name}:"]
    for folder, dirs in folders.items():
        lines.append(f"    {folder}: |")
        lines += [f"        {d}" for d in dirs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class ComfyServer:
    def __init__(
        self,
        work_dir: str | Path,
        *,
        model_paths: dict[str, list[Path]] | None = None,
        port: int | None = None,
        python: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.python = python or sys.executable
        self.model_paths = model_paths
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.client_id = "megasr-tests-" + uuid.uuid4().hex[:8]
        self.ws_messages: list[dict[str, Any]] = []
        self._ws_stop = threading.Event()
        self._ws_thread: threading.Thread | None = None
        self._object_info: dict[str, Any] | None = None
        self.input_dir = self.work_dir / "input"
        self.output_dir = self.work_dir / "output"
        self.temp_dir = self.work_dir / "temp"
        self.user_dir = self.work_dir / "user"
        self.log_path = self.work_dir / "server.log"

    # --- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            self.python,
            "main.py",
            "--cpu",
            "--disable-api-nodes",
            "--listen",
            self.host,
            "--port",
            str(self.port),
            "--input-directory",
            str(self.input_dir),
            "--output-directory",
            str(self.output_dir),
            "--temp-directory",
            str(self.temp_dir),
            "--user-directory",
            str(self.user_dir),
            "--database-url",
            "sqlite:///:memory:",
        ]
        if self.model_paths:
            yaml_path = write_extra_model_paths(self.work_dir / "extra_model_paths.yaml", self.model_paths)
            cmd += ["--extra-model-paths-config", str(yaml_path)]
        return cmd + self.extra_args

    def start(self, timeout: float = 180.0) -> ComfyServer:
        for d in (self.input_dir, self.output_dir, self.temp_dir, self.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        env = apply_offline_env(dict(os.environ))
        env["PYTHONUNBUFFERED"] = "1"
        self._log_fh = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=str(comfy_dir()),
            env=env,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec(),  # a killed pytest takes its server with it
        )
        log.info("started ComfyUI pid %s on %s", self.proc.pid, self.url)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self._start_ws()
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=5)
                return
            except (OSError, urllib.error.URLError, ValueError):
                time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer on {self.url} within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        self._ws_stop.set()
        if self._ws_thread is not None:
            self._ws_thread.join(timeout=10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if getattr(self, "_log_fh", None):
            self._log_fh.close()

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # --- HTTP ------------------------------------------------------------------------------------
    def request(self, path: str, data: Any = None, method: str | None = None, timeout: float = 60) -> bytes:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method=method or ("POST" if body else "GET"))
        if body is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def get_json(self, path: str, timeout: float = 60) -> Any:
        return json.loads(self.request(path, timeout=timeout))

    def object_info(self, refresh: bool = False) -> dict[str, Any]:
        if self._object_info is None or refresh:
            self._object_info = self.get_json("/object_info", timeout=120)
        return self._object_info

    def add_input(self, src: str | Path, name: str | None = None) -> str:
        """Copy a file into the server's input folder; returns the name LoadImage uses."""
        name = name or Path(src).name
        shutil.copyfile(src, self.input_dir / name)
        return name

    def queue(self, prompt: dict[str, Any], extra_data: dict[str, Any] | None = None) -> str:
        payload: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        try:
            answer = json.loads(self.request("/prompt", payload))
        except urllib.error.HTTPError as err:
            raise ServerError(f"POST /prompt rejected ({err.code}): {err.read().decode(errors='replace')}") from err
        if answer.get("node_errors"):
            raise ServerError(f"POST /prompt node errors: {answer['node_errors']}")
        return str(answer["prompt_id"])

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt finished; raises ``ServerError`` when it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise ServerError(f"prompt {prompt_id} failed: {json.dumps(status.get('messages'))[:4000]}")
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")

    def run(self, prompt: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        return self.wait(self.queue(prompt), timeout)

    def view(self, image: dict[str, Any]) -> bytes:
        """Bytes of one output image entry (``{"filename", "subfolder", "type"}``) via ``GET /view``."""
        query = urllib.parse.urlencode(
            {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image.get("type", "")}
        )
        return self.request(f"/view?{query}")

    def events(self, prompt_id: str | None = None) -> list[dict[str, Any]]:
        """WebSocket JSON messages received so far (optionally only those of one prompt)."""
        msgs = list(self.ws_messages)
        if prompt_id is None:
            return msgs
        return [m for m in msgs if (m.get("data") or {}).get("prompt_id") == prompt_id]

    def wait_event(self, event: str, prompt_id: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.events(prompt_id):
                if m.get("type") == event:
                    return m
            time.sleep(0.1)
        raise ServerError(f"no '{event}' websocket event for {prompt_id} within {timeout:.0f}s")

    # --- WebSocket (aiohttp, ComfyUI's own dependency, in a background thread) ---------------------
    def _start_ws(self) -> None:
        ready = threading.Event()
        self._ws_thread = threading.Thread(target=lambda: asyncio.run(self._ws_loop(ready)), daemon=True)
        self._ws_thread.start()
        ready.wait(timeout=20)

    async def _ws_loop(self, ready: threading.Event) -> None:
        import aiohttp

        url = f"ws://{self.host}:{self.port}/ws?clientId={self.client_id}"
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(url, heartbeat=20) as ws:
                ready.set()
                while not self._ws_stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        self.ws_messages.append(json.loads(msg.data))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
        except Exception as err:  # the HTTP checks still work; the event checks will report the loss
            log.warning("websocket listener stopped: %s", err)
        finally:
            ready.set()


def repo_workflows() -> list[Path]:
    return sorted((REPO_ROOT / "workflows").glob("*.json"))
