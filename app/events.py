"""SegScope's one observer mechanism: psygnal signals, connected through :func:`connect`.

Every Qt-free model (:class:`~segscope.app.state.SessionState`,
:class:`~segscope.app.labels.LabelStore`, :class:`~segscope.app.plot_controller.PlotController`,
:class:`~segscope.app.session.Session`) declares its events as a psygnal
:class:`~psygnal.SignalGroup` on ``.events``. Subscribers connect with :func:`connect`, which
adds what the app needs on top of psygnal:

* one failing subscriber is logged and does not stop the others (psygnal's own emit stops
  at the first exception and raises it in the emitter, which would break a model mutation
  because a view failed to redraw);
* changes carry an optional origin (:func:`emitting_from`), and a subscriber connected with
  ``name`` does not hear changes that came from itself, so linked views never echo.

Emission is synchronous, on the thread that mutates the model (the Qt main thread in the app).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from psygnal import SignalInstance

log = logging.getLogger(__name__)

_origin = threading.local()


def current_origin() -> str | None:
    """The origin of the change being emitted on this thread (None: unnamed)."""
    return getattr(_origin, "value", None)


@contextlib.contextmanager
def emitting_from(origin: str | None) -> Iterator[None]:
    """Emit inside this block as a change from ``origin`` (``"plot"``, ``"3d"``...)."""
    previous = current_origin()
    _origin.value = origin
    try:
        yield
    finally:
        _origin.value = previous


def connect(signal: SignalInstance, callback: Callable[..., Any], *, name: str | None = None) -> Callable[[], None]:
    """Call ``callback(*args)`` on every emission of ``signal``; returns a disconnect function.

    Parameters
    ----------
    signal
        A psygnal signal instance (``model.events.<name>``).
    callback
        Called with the signal's arguments. Exceptions are logged, not raised.
    name
        The subscriber's own origin name: emissions made inside ``emitting_from(name)``
        are not delivered to it.
    """

    def guarded(*args: Any) -> None:
        if name is not None and current_origin() == name:
            return
        try:
            callback(*args)
        except Exception:  # one broken view must not stop the others or the model
            log.exception("subscriber %r of %s failed", callback, signal.name)

    signal.connect(guarded, check_nargs=False)

    def disconnect() -> None:
        with contextlib.suppress(ValueError):
            signal.disconnect(guarded)

    return disconnect
