"""Atomic writes: build aside in a hidden temporary sibling, then rename into place.

A reader never sees a half-written file or folder, an interrupted export leaves the previous
result untouched, and nothing existing is replaced unless the caller passes ``force=True``.

Temporary siblings are named ``.NAME.<pid>.<random>.tmp`` (and an old folder being replaced
``.NAME.<pid>.<random>.old``); the next write of ``NAME`` removes those a killed process left
behind (its pid no longer running), so a ``kill -9`` costs disk space only until the next run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def check_writable(path: str | Path, force: bool) -> Path:
    """Return ``path`` as a Path; FileExistsError if it exists and ``force`` is False."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise FileExistsError(f"{path} already exists; use --force (force=True) to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"parent folder of {path} does not exist")
    return path


def _temp_sibling(path: Path, *, directory: bool) -> Path:
    # Same folder as the target, so the final rename stays on one file system (atomic). The
    # pid in the name tells a later run whether the writer is still alive.
    remove_leftovers(path)
    prefix = f".{path.name}.{os.getpid()}."
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _set_default_permissions(path: Path, *, directory: bool) -> None:
    # mkstemp/mkdtemp create private entries (0600/0700); exports get the usual umask-based
    # permissions so that a web server run by another user can serve them.
    os.chmod(path, (0o777 if directory else 0o666) & ~_current_umask())


def _current_umask() -> int:
    # Reading the umask through os.umask briefly changes it for every thread; Linux reports
    # it in /proc without side effects, so use that where available.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk (before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A leftover without a pid in its name (written before names carried one) is removed once it
# is this old: no export takes an hour between creating its temporary folder and renaming it.
_LEGACY_LEFTOVER_AGE_S = 3600.0


def remove_leftovers(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` that a killed writer left behind.

    Those are ``.NAME.<pid>.*.tmp`` and ``.NAME.<pid>.*.old`` whose process is no longer
    running (another live writer's are kept), and pid-less ones from older versions once
    an hour old. Returns what was removed.
    """
    import time

    path = Path(path)
    removed: list[Path] = []
    try:
        candidates = list(path.parent.glob(f".{_glob_escape(path.name)}.*"))
    except OSError:
        return removed
    for candidate in candidates:
        rest = candidate.name[len(path.name) + 2 :]
        if not rest.endswith((".tmp", ".old")):
            continue
        pid_text = rest.split(".", 1)[0]
        if pid_text.isdigit() and "." in rest[len(pid_text) + 1 :]:
            stale = not _pid_running(int(pid_text))
        else:
            try:
                stale = time.time() - candidate.lstat().st_mtime > _LEGACY_LEFTOVER_AGE_S
            except OSError:
                continue
        if stale:
            _remove(candidate)
            removed.append(candidate)
            log.info("removed %s, left by an interrupted write", candidate)
    return removed


def _glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    # A killed child that its parent has not reaped yet still answers kill(pid, 0).
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    target = check_writable(path, force)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder; refusing to replace it with a file")
    temporary = _temp_sibling(target, directory=False)
    try:
        yield temporary
        _set_default_permissions(temporary, directory=False)
        fsync_file(temporary)  # the rename must not reach the disk before the data does
        os.replace(temporary, target)
    except BaseException:
        _remove(temporary)
        raise


@contextlib.contextmanager
def staged_in_sibling(path: str | Path) -> Iterator[Path]:
    """Yield ``FOLDER/NAME`` inside a hidden temporary sibling folder; on success it replaces ``path``.

    For writers that insist on the final file name (Keras wants ``*.keras``): the file keeps
    its name while it is written aside. Replaces an existing file; leftovers of a killed
    writer are removed as for :func:`atomic_file`.
    """
    target = Path(path)
    work = _temp_sibling(target, directory=True)
    staged = work / target.name
    try:
        yield staged
        _set_default_permissions(staged, directory=False)
        fsync_file(staged)
        os.replace(staged, target)
    finally:
        _remove(work)


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it takes the place of ``path``.

    An existing ``path`` (only with ``force``) is renamed aside and deleted only after the
    new folder is in place: readers see the old complete folder or the new complete one
    (with a moment of none between the two renames), never a partial one.
    """
    target = check_writable(path, force)
    temporary = _temp_sibling(target, directory=True)
    try:
        yield temporary
        _set_default_permissions(temporary, directory=True)
        if target.exists() or target.is_symlink():
            trash = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.old")
            os.rename(target, trash)
            os.rename(temporary, target)
            _remove(trash)
        else:
            os.rename(temporary, target)
    except BaseException:
        _remove(temporary)
        raise
