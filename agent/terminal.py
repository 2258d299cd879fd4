"""The CLI's side of consoles and interactive exec: this terminal (raw while attached) joined
to a websocket (agent.client.Client.websocket). The message shapes are the agent's
(agent/services/console.py, agent/services/execs.py)."""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import termios
import threading
import tty

DETACH_KEY = b"\x1d"  # Ctrl-]: leaves a console (as telnet and virsh console)
STDIN_CHUNK = 4096


class _Raw:
    """This terminal in raw mode while attached (restored on exit); nothing if stdin is no tty."""

    def __init__(self, enable: bool):
        self.fd = sys.stdin.fileno()
        self.enable = enable and os.isatty(self.fd)
        self.saved = None

    def __enter__(self):
        if self.enable:
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)  # what was typed before stays
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def _say(text: str) -> None:
    """A line on stderr that reads right in raw mode too."""
    sys.stderr.write(text.replace("\n", "\r\n") + "\r\n")
    sys.stderr.flush()


def terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
        return (size.columns or 80), (size.lines or 24)  # a new pty says 0x0
    except OSError:
        return 80, 24


def _send_size(conn) -> None:
    """Tell the remote terminal this one's size (a resize message); a closed session ignores it."""
    cols, rows = terminal_size()
    try:
        conn.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))
    except Exception:
        pass


def console(conn, name: str) -> int:
    """Attach to a console until Ctrl-] or until the agent closes it; 0. The console (a
    container's terminal) takes this terminal's size, now and when it changes."""
    done = threading.Event()
    out = sys.stdout.buffer

    def resized(*_):
        _send_size(conn)

    def reader():
        try:
            for msg in conn:
                if isinstance(msg, bytes):
                    out.write(msg)
                    out.flush()
                else:
                    _say(f"[nodeagent] {json.loads(msg).get('message', msg)}")
        except Exception:
            pass
        done.set()

    sized = os.isatty(sys.stdout.fileno())
    old = signal.signal(signal.SIGWINCH, resized) if sized else None
    with _Raw(True):
        _say(f"connected to the console of {name}; detach with Ctrl-]")
        threading.Thread(target=reader, daemon=True).start()
        if sized:
            resized()
        try:
            while not done.is_set():
                if not select.select([sys.stdin], [], [], 0.2)[0]:
                    continue
                data = os.read(sys.stdin.fileno(), STDIN_CHUNK)
                if not data:
                    break  # stdin ended: keep nothing open
                if DETACH_KEY in data:
                    data = data[:data.index(DETACH_KEY)]
                    if data:
                        conn.send(data)
                    break
                conn.send(data)
        except Exception:
            pass
        finally:
            if old is not None:
                signal.signal(signal.SIGWINCH, old)
            conn.close()
    reason = getattr(conn, "close_reason", None)
    _say(f"detached from {name}" + (f" ({reason})" if reason else ""))
    return 0


def exec_session(conn, tty_mode: bool) -> int:
    """Run an interactive exec to its end; its exit code (255 if the session broke)."""
    box: dict = {"code": None}
    done = threading.Event()
    streams = {1: sys.stdout.buffer, 2: sys.stderr.buffer}

    def reader():
        try:
            for msg in conn:
                if isinstance(msg, bytes):
                    if msg and msg[0] in streams:
                        streams[msg[0]].write(msg[1:])
                        streams[msg[0]].flush()
                else:
                    ctl = json.loads(msg)
                    if ctl.get("type") == "exit":
                        box["code"] = ctl["exit_code"]
                    else:
                        _say(f"[nodeagent] {ctl.get('message', msg)}")
        except Exception:
            pass
        done.set()

    def resized(*_):
        _send_size(conn)

    old = signal.signal(signal.SIGWINCH, resized) if tty_mode else None
    with _Raw(tty_mode):
        threading.Thread(target=reader, daemon=True).start()
        try:
            stdin_open = True
            while not done.is_set():
                if not stdin_open or not select.select([sys.stdin], [], [], 0.2)[0]:
                    done.wait(0.2)
                    continue
                data = os.read(sys.stdin.fileno(), STDIN_CHUNK)
                if data:
                    conn.send(data)
                else:
                    stdin_open = False
                    conn.send(json.dumps({"type": "eof"}))
        except Exception:
            pass
        finally:
            if old is not None:
                signal.signal(signal.SIGWINCH, old)
            done.wait(5)
            conn.close()
    if box["code"] is None:
        _say(f"[nodeagent] the session ended without an exit code ({getattr(conn, 'close_reason', '') or 'closed'})")
        return 255
    return box["code"]
