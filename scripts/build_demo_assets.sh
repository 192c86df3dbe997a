#!/usr/bin/env bash
# Rebuild the shipped demo model and classifiers (assets/) from scratch, exactly as they were
# made: see assets/MODEL_CARD.md. Takes about an hour on a 2-core machine.
#
# `scripts/build_demo_assets.sh --context-only` rebuilds only assets/demo_context.parquet
# (the plot's context embeddings of the whole demo), e.g. after the demo generator changed.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/demo-lite}
SEGSCOPE=${SEGSCOPE:-.venv/bin/segscope}

if [ "${1:-}" != "--context-only" ]; then
"$SEGSCOPE" train --out "$RUN" --steps 1500 --holdout-type microglia --seed 0
"$SEGSCOPE" evaluate --run "$RUN" --out "$RUN/eval" --compartment-radius-nm 2500 \
    --save-classifiers "$RUN/classifiers"

mkdir -p assets/classifiers
cp "$RUN/encoder.keras" assets/demo_encoder.keras
cp "$RUN/classifiers/"* assets/classifiers/
# The manifest names the encoder file evaluate read; in assets/ it is demo_encoder.keras.
sed -i 's/"encoder": "encoder.keras"/"encoder": "demo_encoder.keras"/' assets/classifiers/classifiers.json
mkdir -p assets/evaluation
cp "$RUN/eval/"*.png "$RUN/eval/metrics.json" "$RUN/split.json" assets/evaluation/
"$(dirname "$SEGSCOPE")/python" - "$RUN/history.json" <<'PY'
import json, sys
from segscope.analysis.training import plot_loss_curve
plot_loss_curve(json.load(open(sys.argv[1]))["loss"], "assets/evaluation/loss_curve.png",
                title="Demo lite encoder: contrastive training loss")
PY
fi

# The plot's context: every segment of the default demo dataset (seed 0, 256^3), embedded by
# the shipped encoder and labelled by the shipped classifiers. The Parquet's metadata records
# the generator version, seed, size and the sha256 of the encoder and classifier files;
# app/demo_context.py shows it only while they all still match. A fresh copy of the demo is
# generated (byte-identical to the app's cached one) so the record describes the current
# generator. About 2 minutes on the 2-core machine (2:13 measured: 23 s data, 35 s embedding
# 4,535 nodes of 1,036 segments, 65 s labelling, the rest start-up); 1.7 MB.
"$SEGSCOPE" demo-data --out "$RUN/demo" --seed 0 --force
"$SEGSCOPE" embed --image "$RUN/demo/image" --segmentation "$RUN/demo/segmentation" --segments all \
    --checkpoint assets/demo_encoder.keras --classifiers assets/classifiers \
    --out assets/demo_context.parquet --force
# embed also writes a per-segment table beside its output; the app does not read it.
rm -f assets/demo_context.segments.parquet
