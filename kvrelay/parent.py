"""Children that die with the process that started them (`kvrelay up`, test clusters, Ray actors).

The child arranges it itself (PR_SET_PDEATHSIG), first thing at import, rather than in a
`preexec_fn`: that runs Python between fork and exec, which is unsafe when the parent has other
threads (the child can deadlock, and the parent then waits forever inside Popen).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# Not a KVRELAY_ setting (those are validated): the pid of the process this one must not outlive.
PARENT_ENV = "_KVRELAY_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def launched_env() -> dict[str, str]:
    """Environment entries for a kvrelay child that must die with this process."""
    return {PARENT_ENV: str(os.getpid())}


def die_with_launcher() -> None:
    pid = os.environ.pop(PARENT_ENV, None)
    if pid is None or sys.platform != "linux":
        return
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(pid):  # the launcher was gone before the line above
        os.kill(os.getpid(), signal.SIGTERM)
