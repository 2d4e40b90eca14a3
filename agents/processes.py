"""Background processes Paymaster started: recognising them by pid, and stopping them safely.

A pid read from a state file may belong to an unrelated process by now: the
one we started exited and the number was handed out again. So nothing here
signals a pid before its command line says it is ours, and on Linux the
signal goes through a pidfd opened *before* that check, so a process that
exits and hands its pid on between the check and the signal is never hit.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Decides from a command line (see :func:`command_words`) whether a process is ours.
Identity = Callable[[Sequence[str]], bool]


# What _handle yields when the process has already exited (else a pidfd, or
# None where pidfds are not available).
_GONE = -1


@dataclass(frozen=True, slots=True)
class Recorded:
    """A background server as its state file records it."""

    pid: int
    port: int


def command_words(pid: int) -> list[str] | None:
    """The command line of ``pid`` split into words; None if no such process is visible.

    Arguments are split on whitespace too: a server may rewrite its title into
    one argument (a daemonized redis-server shows ``redis-server 127.0.0.1:6379``).
    """
    if Path("/proc/self").exists():
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        text = raw.replace(b"\0", b" ").decode("utf-8", "replace")
    else:  # no /proc (macOS, BSD): ask ps
        done = subprocess.run(
            ["ps", "-ww", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            check=False,
        )
        text = done.stdout if done.returncode == 0 else ""
    # An exited process still waiting to be reaped has an empty command line.
    return text.split() or None


def option(words: Sequence[str], flag: str) -> str | None:
    """The value after ``flag`` (as in ``--port 8439``) in a command line, if any."""
    for word, value in itertools.pairwise(words):
        if word == flag:
            return value
    return None


def _is_running(pid: int) -> bool:
    """True if a process ``pid`` exists (reaping it first if it is our exited child)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process, alive
    return True


def is_ours(pid: int, *, identity: Identity) -> bool:
    """True if ``pid`` runs and its command line passes ``identity``."""
    words = command_words(pid)
    return words is not None and identity(words)


def stop(pid: int, *, identity: Identity, grace_s: float) -> bool:
    """Stop ``pid`` if it is ours: SIGTERM, then SIGKILL after ``grace_s``.

    Returns True if the process was ours and is gone, False if it was not ours
    (or already gone, or another user's) and was left alone.
    """
    with _handle(pid) as handle:
        if handle == _GONE or not is_ours(pid, identity=identity):
            return False
        try:
            _send(pid, handle, signal.SIGTERM)
            if not _wait_gone(pid, handle, timeout_s=grace_s):
                _send(pid, handle, signal.SIGKILL)
                _wait_gone(pid, handle, timeout_s=max(grace_s, 5.0))
        except PermissionError:
            return False
        return True


@contextlib.contextmanager
def _handle(pid: int) -> Iterator[int | None]:
    if sys.platform != "linux":
        yield None
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        yield _GONE
        return
    except OSError:  # a kernel older than 5.3
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _send(pid: int, handle: int | None, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
        if handle is not None and sys.platform == "linux":
            signal.pidfd_send_signal(handle, signum)
        else:
            os.kill(pid, signum)


def _wait_gone(pid: int, handle: int | None, *, timeout_s: float) -> bool:
    if handle is not None:
        # A pidfd becomes readable when its process exits.
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        exited = bool(poller.poll(timeout_s * 1000))
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it was our child
        return exited
    deadline = time.monotonic() + timeout_s
    while _is_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
