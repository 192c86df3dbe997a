"""Real mouse gestures on the embedding plot (offscreen Qt tests): press, moves, release."""

from __future__ import annotations

import numpy as np


def drag_through(qtbot, plot, path_view) -> None:
    """A left-button drag through ``path_view`` (float ``[M, 2]`` view units): press at the
    first point, move through the middle ones, release at the last."""
    from PyQt6.QtCore import QEvent, QPointF, Qt
    from PyQt6.QtGui import QMouseEvent
    from PyQt6.QtWidgets import QApplication

    viewport = plot.graphics.viewport()
    path = np.asarray(path_view, dtype=np.float64)
    for i, xy in enumerate(path):
        pos = QPointF(plot.graphics.mapFromScene(plot.view_box.mapViewToScene(QPointF(*map(float, xy)))))
        kind = (
            QEvent.Type.MouseButtonPress
            if i == 0
            else QEvent.Type.MouseButtonRelease
            if i == len(path) - 1
            else QEvent.Type.MouseMove
        )
        buttons = Qt.MouseButton.NoButton if kind == QEvent.Type.MouseButtonRelease else Qt.MouseButton.LeftButton
        button = Qt.MouseButton.NoButton if kind == QEvent.Type.MouseMove else Qt.MouseButton.LeftButton
        QApplication.sendEvent(
            viewport, QMouseEvent(kind, pos, viewport.mapToGlobal(pos), button, buttons, Qt.KeyboardModifier.NoModifier)
        )
        qtbot.wait(30)  # pyqtgraph drops mouse moves closer than ~16 ms apart


def lasso_loop(layout: np.ndarray, margin: float = 1.3, vertices: int = 24) -> np.ndarray:
    """A closed circle (float ``[vertices, 2]``) around the points ``layout`` ``[k, 2]``."""
    centre = layout.mean(axis=0)
    radius = margin * np.linalg.norm(layout - centre, axis=1).max() + 1e-3
    angles = np.linspace(0, 2 * np.pi, vertices)
    return centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
