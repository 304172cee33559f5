"""What every child process of the server does first: leave the server's process group, take a name that ps
and top show, and arrange to die with the server, even one killed with SIGKILL (Linux's PR_SET_PDEATHSIG).

Signals meant for the server (Ctrl-C, `kill -TERM -<group>`) then reach the server alone, which stops its
children in order: the engine drains, the request workers finish.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1


def become_child(name: str, parent_pid: int) -> None:
    """Leave the parent's process group, name this process (the kernel keeps 15 bytes) and have it killed when
    parent_pid ends; exit at once if the parent is already gone."""
    os.setpgrp()
    if sys.platform == "linux":
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the server died before the line above took effect
        os._exit(1)
