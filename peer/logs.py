"""`--log-json`: every line the peer writes to stderr or stdout is one JSON object.

Log records go through `JsonLogFormatter`. Whatever else reaches the streams (a library's print, a
warning, a traceback, click's usage errors, the training worker's stderr) passes through `JsonLines`,
which lets lines that already are JSON objects through and turns every other line into one. The daemon
tells its worker through the environment (`LOG_JSON_ENV`); the worker logs JSON itself, and the daemon
relays the worker's stderr through `JsonLines`, so that even bytes written below Python (a C library, a
fatal error) arrive as JSON objects.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

LOG_JSON_ENV = "SHOAL_LOG_JSON"  # "1" in the environment of a daemon started with --log-json, and its worker
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ERROR_STARTS = ("Error:", "Fatal Python error")  # wrapped lines logged as errors
TRACEBACK_START = "Traceback (most recent call last):"
MAX_TRACEBACK_LINES = 2000  # a longer one is written in parts
MAX_PARTIAL_LINE = 64 * 1024  # characters of an unfinished line kept before it is written as it stands


def json_mode() -> bool:
    """Whether this process (a daemon started with --log-json, or its worker) writes JSON lines only."""
    return os.environ.get(LOG_JSON_ENV) == "1"


def log_entry(message: str, level: str, logger: str, created: float | None = None) -> dict[str, Any]:
    created = time.time() if created is None else created
    return {
        "ts": round(created, 3),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)),
        "level": level,
        "logger": logger,
        "message": message,
    }


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log record, for log shippers (a traceback stays inside its object)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = log_entry(record.getMessage(), record.levelname, record.name, record.created)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def is_json_object(line: str) -> bool:
    if not (line.startswith("{") and line.endswith("}")):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class JsonLines(io.TextIOBase):
    """A text stream that writes JSON objects only: a line that is one passes, any other line is wrapped
    as a log entry of `logger` at `level`. A Python traceback becomes one entry (its last line the message,
    the whole in "exception"). Blank lines are dropped; carriage returns end a line too (a progress display
    redraws with them)."""

    def __init__(self, target: TextIO, logger: str, level: str = "WARNING"):
        super().__init__()
        self.target = target
        self.logger = logger
        self.level = level
        self._partial = ""
        self._traceback: list[str] | None = None  # the lines of a traceback being written
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # nothing draws progress bars or colours into a JSON stream

    def fileno(self) -> int:
        return self.target.fileno()  # faulthandler and friends write there directly

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() takes str, not {type(text).__name__}")  # a text stream, as click checks
        with self._lock:
            self._partial += text.replace("\r\n", "\n").replace("\r", "\n")
            *lines, self._partial = self._partial.split("\n")
            if len(self._partial) > MAX_PARTIAL_LINE:
                lines.append(self._partial)
                self._partial = ""
            for line in lines:
                self._emit(line)
            if lines:
                self.target.flush()
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close(self) -> None:
        """Writes an unfinished last line; the target stays open (it is usually the process's stderr)."""
        with self._lock, contextlib.suppress(ValueError, OSError):  # the target may be closed at exit
            if self._partial:
                self._emit(self._partial)
                self._partial = ""
            if self._traceback:
                self._write_entry(self._traceback[-1], "ERROR", "\n".join(self._traceback))
                self._traceback = None
            self.target.flush()

    def _emit(self, line: str) -> None:
        line = line.rstrip()
        if not line.strip():
            return
        if self._traceback is not None:
            self._traceback.append(line)
            # Its frames are indented; the first unindented line names the exception and ends it.
            if not line[:1].isspace() or len(self._traceback) >= MAX_TRACEBACK_LINES:
                self._write_entry(line, "ERROR", "\n".join(self._traceback))
                self._traceback = None
        elif line.startswith(TRACEBACK_START):
            self._traceback = [line]
        elif is_json_object(line):
            self.target.write(line + "\n")
        else:
            self._write_entry(line, "ERROR" if line.startswith(ERROR_STARTS) else self.level)

    def _write_entry(self, message: str, level: str, exception: str = "") -> None:
        entry = log_entry(message, level, self.logger)
        if exception:
            entry["exception"] = exception
        self.target.write(json.dumps(entry) + "\n")


def _log_uncaught(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
    """sys.excepthook under --log-json: an uncaught exception is one JSON object, not a text traceback."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    logging.getLogger("shoal").critical("uncaught exception: %s", value, exc_info=(kind, value, traceback))


def setup(verbose: bool, as_json: bool, stderr_logger: str = "stderr") -> None:
    """Logging for a `peer` process: text lines, or (as_json) JSON objects on stderr and JSON-only stderr
    and stdout streams, a JSON excepthook, and warnings as log records. Marks the environment so that
    child processes (the training worker) do the same."""
    level = logging.DEBUG if verbose else logging.INFO
    if not as_json:
        os.environ.pop(LOG_JSON_ENV, None)  # not inherited from a caller's environment: text means text
        logging.basicConfig(level=level, stream=sys.stderr, format=TEXT_FORMAT)
        return
    os.environ[LOG_JSON_ENV] = "1"
    real_stderr = sys.stderr
    handler = logging.StreamHandler(real_stderr)
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    sys.stderr = JsonLines(real_stderr, stderr_logger, "WARNING")
    sys.stdout = JsonLines(sys.stdout, "stdout", "INFO")
