"""Child-process plumbing for the launcher, the trainer and the sidecars.

Every child of `python -m dapo_jax.launch` leads its own process group (its workers, e.g.
vLLM's engine processes or the reward pool, join it), so one `killpg` ends all of it. A
child started with `PARENT_PID_ENV` in its environment ends its group when that parent is
gone, so even a launcher killed with SIGKILL leaves no engine behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

PARENT_PID_ENV = "DAPO_PARENT_PID"


def exit_with_parent(poll_s: float = 0.5) -> None:
    """If `PARENT_PID_ENV` is set, watch that process from a daemon thread and kill this
    process group (this process and its workers) as soon as it is gone."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return
    parent_pid = int(parent)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the process group `proc` leads, SIGKILL to what is left after `grace_s`
    (also to workers that outlive their leader), then reaps `proc`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_alive(proc.pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in the group. Zombies are skipped: after
    a SIGKILLed parent they wait for PID 1 to reap them, which a container's init may never
    do."""
    proc = Path("/proc")
    if not proc.exists():  # not Linux: signal 0 counts zombies too
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            return True
    return False


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ("" if it does not exist)."""
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])
