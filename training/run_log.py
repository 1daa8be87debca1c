"""Where the training CLI's messages go: ours to the console, everything (third-party noise too) to the log.

The console shows the ``training`` / ``megasr`` loggers at the chosen level and anything else only from
ERROR up; Python warnings (controlnet_aux, timm deprecations) and the transformers / diffusers loggers go
to the run's ``train.log`` only, with the full traceback of any failure. Until the run folder is known the
records are held in memory; a failure before that writes them to a log file in the temp folder.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

__all__ = ["RunLog"]

_OURS = ("training", "megasr")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleFilter(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        ours = record.name.split(".")[0] in _OURS
        return record.levelno >= (self.level if ours else logging.ERROR)


class _Buffer(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


class RunLog:
    """``with RunLog(level) as log: ... log.attach(run_dir / "train.log")``."""

    def __init__(self, level: str = "INFO") -> None:
        self.level = getattr(logging, level)
        self.path: Path | None = None
        self._handlers: list[logging.Handler] = []
        self._buffer = _Buffer()
        self._file: logging.Handler | None = None
        self._old_level = logging.getLogger().level
        fmt = f"%(asctime)s %(levelname)s [rank {_rank()}] %(name)s: %(message)s"
        self._formatter = logging.Formatter(fmt)

    def __enter__(self) -> "RunLog":
        root = logging.getLogger()
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(_FORMAT))
        console.addFilter(_ConsoleFilter(self.level))
        for h in (console, self._buffer):
            root.addHandler(h)
            self._handlers.append(h)
        root.setLevel(min(self.level, logging.INFO))
        for name in _OURS:
            logging.getLogger(name).setLevel(min(self.level, logging.INFO))
        logging.captureWarnings(True)
        self._route_library_loggers()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def _route_library_loggers() -> None:
        """transformers / diffusers print through their own handlers: send them through ours instead."""
        for lib in ("transformers", "diffusers"):
            try:
                mod = __import__(f"{lib}.utils.logging", fromlist=["logging"])
            except Exception:  # noqa: BLE001 - not installed: nothing to route
                continue
            mod.disable_default_handler()
            mod.enable_propagation()
            mod.set_verbosity_info()

    @staticmethod
    def _restore_library_loggers() -> None:
        for lib in ("transformers", "diffusers"):
            mod = sys.modules.get(f"{lib}.utils.logging")
            if mod is None:
                continue
            mod.set_verbosity_warning()
            mod.disable_propagation()
            mod.enable_default_handler()

    def attach(self, path: Path | None) -> None:
        """Start writing to ``path`` (appending), with what was logged so far."""
        if path is None or self._file is not None:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._open(path)

    def _open(self, path: Path) -> None:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(self._formatter)
        handler.setLevel(logging.DEBUG)
        for record in self._buffer.records:
            handler.handle(record)
        logging.getLogger().removeHandler(self._buffer)
        self._buffer.records.clear()
        logging.getLogger().addHandler(handler)
        self._handlers.append(handler)
        self._file = handler
        self.path = path

    def record_exception(self, exc: BaseException) -> str:
        """Write ``exc``'s full traceback to the log file (not the console); returns where it went."""
        if self._file is None:
            fd, name = tempfile.mkstemp(prefix="megasr-train-", suffix=".log")
            os.close(fd)
            self._open(Path(name))
        text = "".join(traceback.format_exception(exc))
        logging.getLogger("training.failure").error("%s", text, extra={"file_only": True})
        return str(self.path)

    def error(self, message: str, rank_zero_only: bool = False) -> None:
        """The one line the user reads (stderr); other ranks say they stop with rank 0."""
        if rank_zero_only and _rank() != 0:
            message = message.split(": error:")[0] + f": stopped (rank {_rank()}); rank 0 reports the problems"
        print(message, file=sys.stderr)

    def close(self) -> None:
        root = logging.getLogger()
        for h in self._handlers:
            root.removeHandler(h)
            h.close()
        self._handlers.clear()
        root.setLevel(self._old_level)
        logging.captureWarnings(False)
        self._restore_library_loggers()
