"""Posting work to the Qt main thread from any thread."""

from __future__ import annotations

from collections.abc import Callable

from PyQt6.QtCore import QObject, Qt, pyqtSignal


class MainThreadInvoker(QObject):
    """Runs callables on the thread this object lives on (the Qt main thread).

    ``post`` may be called from any thread: the signal is delivered through the event
    loop (queued), so the caller never waits.
    """

    _invoke = pyqtSignal(object)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._invoke.connect(self._run, Qt.ConnectionType.QueuedConnection)

    def post(self, fn: Callable[[], None]) -> None:
        self._invoke.emit(fn)

    @staticmethod
    def _run(fn: Callable[[], None]) -> None:
        fn()
