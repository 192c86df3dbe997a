"""What the child-process tests ask of the operating system about a process."""

from __future__ import annotations


def pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a container's init may not reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
