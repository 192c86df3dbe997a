#!/usr/bin/env bash
# Rebuild the shipped demo model and classifiers (assets/) from scratch, exactly as they were
# made: see assets/MODEL_CARD.md. Takes about an hour on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/demo-lite}
SEGSCOPE=${SEGSCOPE:-.venv/bin/segscope}

"$SEGSCOPE" train --out "$RUN" --steps 1500 --holdout-type microglia --seed 0
"$SEGSCOPE" evaluate --run "$RUN" --out "$RUN/eval" --compartment-radius-nm 2500 \
    --save-classifiers "$RUN/classifiers"

mkdir -p assets/classifiers
cp "$RUN/encoder.keras" assets/demo_encoder.keras
cp "$RUN/classifiers/"* assets/classifiers/
mkdir -p assets/evaluation
cp "$RUN/eval/"*.png "$RUN/eval/metrics.json" "$RUN/split.json" assets/evaluation/
"$(dirname "$SEGSCOPE")/python" - "$RUN/history.json" <<'PY'
import json, sys
from analysis.training import plot_loss_curve
plot_loss_curve(json.load(open(sys.argv[1]))["loss"], "assets/evaluation/loss_curve.png",
                title="Demo lite encoder: contrastive training loss")
PY
