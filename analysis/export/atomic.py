"""Atomic writes: build aside in a hidden temporary sibling, then rename into place.

A reader never sees a half-written file or folder, an interrupted export leaves the previous
result untouched, and nothing existing is replaced unless the caller passes ``force=True``.
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
        raise FileExistsError(f"{path} already exists; pass force=True (--force) to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"parent folder of {path} does not exist")
    return path


def _temp_sibling(path: Path, *, directory: bool) -> Path:
    # Same folder as the target, so the final rename stays on one file system (atomic).
    prefix = f".{path.name}."
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
            trash = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
            os.rename(target, trash)
            os.rename(temporary, target)
            _remove(trash)
        else:
            os.rename(temporary, target)
    except BaseException:
        _remove(temporary)
        raise
