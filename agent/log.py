"""Structured logging: one JSON object per line (or text with key=value fields), journald's
native fields under systemd, or a rotated file in daemon mode.

Use ``log = logging.getLogger(__name__)`` and ``log.info("image imported", extra={"image":
id, "bytes": n})``; every key given in ``extra`` lands in the line. The request id of the
request being served (``X-Request-Id``) and the operation being run are added to every
line logged while they are current (``bind``), in the request's thread and in the
operation's worker alike.

Where lines go (``setup``, config ``log_target``): ``journal`` sends each record to journald
over its native protocol (a datagram to /run/systemd/journal/socket; fields MESSAGE,
PRIORITY, SYSLOG_IDENTIFIER, CODE_*, and each extra as an upper-case field such as
REQUEST_ID or OPERATION); ``file`` writes ``log_file``, rotated by size (RotatingFileHandler,
``log_max_bytes``/``log_backups``) or, with ``log_max_bytes = 0``, reopened when an external
logrotate moves it (WatchedFileHandler); ``stderr``; ``auto`` picks the journal when
systemd connected stderr to it ($JOURNAL_STREAM names stderr's device and inode), else the
file when ``log_file`` is set, else stderr.
"""
from __future__ import annotations

import contextvars
import fcntl
import json
import logging
import logging.handlers
import os
import re
import secrets
import socket
import struct
import sys
import time
from contextlib import contextmanager

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "nodeagent"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}$")  # a client's X-Request-Id we keep
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
LOG_FILE_MODE = 0o600  # error details name host paths, argv, stderr: root's only
# seconds a line may wait for a backed-up journald before it goes to stderr instead: the event
# loop writes access lines, and must not stall behind the journal
JOURNAL_SEND_TIMEOUT = 0.5

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_BARE = re.compile(r"[!#-<>-\[\]-~]+")  # printable ASCII but space, '"', '=', '\\': a text value left unquoted
_context: contextvars.ContextVar[dict] = contextvars.ContextVar("nodeagent_log_context", default={})


# -- the request id and operation of the work at hand --

def new_request_id() -> str:
    return secrets.token_hex(16)


def request_id_from(header: str | None) -> str:
    """A client's ``X-Request-Id`` if it is one line of at most 128 safe characters, else a new id."""
    if header and REQUEST_ID_RE.fullmatch(header):
        return header
    return new_request_id()


def current(key: str) -> str | None:
    """``request_id`` or ``operation`` of the work this thread does now (None outside any)."""
    return _context.get().get(key)


@contextmanager
def bind(**fields):
    """Add ``fields`` (request_id, operation) to every line logged by this thread meanwhile."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def set_context(**fields) -> contextvars.Token:
    """``bind`` for code that cannot wrap the work in a ``with`` (a request's hooks); undo with
    ``reset_context``."""
    return _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


def reset_context(token: contextvars.Token) -> None:
    _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the current request id and operation on each record (unless ``extra`` gave them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


# -- formats --

class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE key=value ...``; a value with spaces, quotes or control
    characters is quoted (JSON string rules), so a client's path cannot forge a line."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = []
        for key, value in _extras(record).items():
            if value is None:
                text = "null"
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                text = str(value)
            else:
                text = value if isinstance(value, str) else json.dumps(value, default=str)
                if not _BARE.fullmatch(text):
                    text = json.dumps(text)
            fields.append(f"{key}={text}")
        if not fields:
            return line
        head, nl, rest = line.partition("\n")  # a traceback stays below the fields
        return f"{head} {' '.join(fields)}{nl}{rest}"


# -- journald --

def _journal_name(key: str) -> str:
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    return name[:64]


def _journal_field(name: str, value) -> bytes:
    data = (value if isinstance(value, str) else json.dumps(value, default=str)).encode("utf-8", "replace")
    if b"\n" in data:  # the binary-safe form: NAME\n, a 64-bit little-endian length, the bytes
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


class JournalHandler(logging.Handler):
    """Records to journald over its native protocol, each a datagram of fields (one too large
    for a datagram goes in a sealed memfd, as sd_journal_send does). If the journal cannot
    be reached, the line goes to stderr instead."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback=None):
        super().__init__()
        self.path = path
        self.fallback = fallback or sys.stderr
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(JOURNAL_SEND_TIMEOUT)
        self._text = TextFormatter()

    def payload(self, record: logging.LogRecord) -> bytes:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self._text.formatException(record.exc_info)
        fields = [("MESSAGE", message), ("PRIORITY", str(PRIORITIES.get(record.levelno, 6))),
                  ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER), ("LOGGER", record.name),
                  ("CODE_FILE", record.pathname), ("CODE_LINE", str(record.lineno)),
                  ("CODE_FUNC", record.funcName), ("THREAD_NAME", record.threadName or "")]
        reserved = {n for n, _ in fields}
        for key, value in _extras(record).items():
            name = _journal_name(key)
            if name not in reserved:
                fields.append((name, value))
        return b"".join(_journal_field(n, v) for n, v in fields)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.payload(record)
            try:
                self._sock.sendto(data, self.path)
            except OSError as e:
                if e.errno not in (90, 105):  # EMSGSIZE, ENOBUFS: too large for a datagram
                    raise
                self._send_memfd(data)
        except OSError:
            try:
                self.fallback.write(self._text.format(record) + "\n")
                self.fallback.flush()
            except Exception:
                self.handleError(record)
        except Exception:
            self.handleError(record)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("nodeagent-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()
        super().close()


def under_journal(env=None, stream=None) -> bool:
    """True if systemd connected ``stream`` (stderr) to the journal: $JOURNAL_STREAM is its
    ``device:inode`` (a child whose stderr was redirected keeps the variable, not the match)."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _file_handler(path: str, max_bytes: int, backups: int) -> logging.Handler:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, LOG_FILE_MODE))
    if max_bytes:
        return _PrivateRotatingHandler(path, maxBytes=max_bytes, backupCount=backups)
    return logging.handlers.WatchedFileHandler(path)  # logrotate moves it; reopened at the next line


class _PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """Each new file is made 0600, like the first."""

    def _open(self):
        os.close(os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         LOG_FILE_MODE))
        return super()._open()


def setup(level: str = "info", fmt: str = "json", stream=None, *, target: str = "stderr",
          file: str | None = None, max_bytes: int = 0, backups: int = 5,
          journal_socket: str = JOURNAL_SOCKET, env=None) -> str:
    """Configure the root logger once, for the daemon and the CLI; return the target chosen
    (stderr | journal | file)."""
    if target == "auto":
        if under_journal(env, stream) and os.path.exists(journal_socket):
            target = "journal"
        else:
            target = "file" if file else "stderr"
    if target == "journal":
        handler: logging.Handler = JournalHandler(journal_socket, fallback=stream)
    elif target == "file" and file:
        handler = _file_handler(file, max_bytes, backups)
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    else:
        target = "stderr"
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return target
