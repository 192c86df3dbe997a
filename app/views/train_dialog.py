"""The *Train classifier* result: the new classifier's grouped cross-validation next to the current one.

Shows the report :meth:`segscope.app.service.SessionService.train_classifier` hands back
(balanced accuracy, per-class recall and the confusion matrix of the grouped-by-segment
cross-validation, and the current classifier's score on the same labels). *Accept* loads
the new classifiers (``accept_trained``), *Keep current* leaves them; the window's
*Revert classifier* undoes an accept.
"""

from __future__ import annotations

from typing import Any

from PyQt6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)


def _format_score(score: dict[str, Any] | None) -> str:
    if score is None:
        return "—"
    return f"{score['balanced_accuracy']:.3f}"


def summary_text(report: dict[str, Any]) -> str:
    """The dialog's headline (plain text): what was trained, on what, and both scores."""
    task = report["task"].replace("_", "-")
    current = report.get("current")
    lines = [
        (
            f"New {task} classifier: {len(report['classes'])} classes ({', '.join(report['classes'])}), "
            f"{report['n_examples']} labelled nodes of {report['n_segments']} segments, "
            f"embeddings aggregated over {report['radius_nm']:g} nm."
        ),
        f"Balanced accuracy, cross-validated with whole segments held out: {_format_score(report['score'])}",
        f"Current classifier on the same labels: {_format_score(current)}"
        + ("" if current is not None else " (none loaded, or it takes other embeddings)"),
    ]
    if report.get("ood_threshold") is not None:
        lines.append(
            f"Flagged out of distribution above an OOD score of {report['ood_threshold']:.4g} "
            f"(threshold from the {report.get('ood_threshold_from') or 'validation split'})."
        )
    if current is not None:
        lines.append(
            "The current classifier is scored on labels it was not trained on, the new one by cross-validation: "
            "both are estimates on nodes the model did not see."
        )
    return "\n".join(lines)


class TrainResultDialog(QDialog):
    """Accept (``exec() == Accepted``) or keep the current classifier, given a training report."""

    def __init__(self, report: dict[str, Any], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.report = report
        self.setWindowTitle("Trained classifier")
        layout = QVBoxLayout(self)
        self.summary = QLabel(summary_text(report))
        self.summary.setWordWrap(True)
        layout.addWidget(self.summary)

        score, current = report["score"], report.get("current")
        classes = list(score["class_names"])
        layout.addWidget(QLabel("Recall per class (fraction of each label's nodes predicted as it):"))
        self.recall_table = QTableWidget(len(classes), 2, self)
        self.recall_table.setHorizontalHeaderLabels(["new (cross-validated)", "current"])
        self.recall_table.setVerticalHeaderLabels(classes)
        for row, name in enumerate(classes):
            self.recall_table.setItem(row, 0, QTableWidgetItem(f"{score['recall'][name]:.3f}"))
            value = None if current is None else current["recall"].get(name)
            self.recall_table.setItem(row, 1, QTableWidgetItem("—" if value is None else f"{value:.3f}"))
        self.recall_table.resizeColumnsToContents()
        layout.addWidget(self.recall_table)

        layout.addWidget(QLabel("Confusion of the new classifier (rows: label, columns: prediction):"))
        columns = [*classes, "(other)"]
        confusion = score["confusion"]
        self.confusion_table = QTableWidget(len(classes), len(columns), self)
        self.confusion_table.setHorizontalHeaderLabels(columns)
        self.confusion_table.setVerticalHeaderLabels(classes)
        for row, values in enumerate(confusion):
            for column, value in enumerate(values):
                self.confusion_table.setItem(row, column, QTableWidgetItem(str(int(value))))
        self.confusion_table.resizeColumnsToContents()
        layout.addWidget(self.confusion_table)

        buttons = QDialogButtonBox(self)
        self.accept_button = buttons.addButton("Accept new classifier", QDialogButtonBox.ButtonRole.AcceptRole)
        self.keep_button = buttons.addButton("Keep current", QDialogButtonBox.ButtonRole.RejectRole)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
