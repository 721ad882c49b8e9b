#!/usr/bin/env bash
# Ship a base + 4-step pair into toy_models/weights, then regenerate acceptance.json and the cards.
# usage: bash toy_models/recipes/ship.sh BASE_DIR TURBO_DIR V1_COMMIT
# e.g.   bash toy_models/recipes/ship.sh toy_models/weights/v2-candidate/toy-dit-base \
#            toy_models/weights/v2-candidate/toy-dit-turbo4 $(git rev-parse --short HEAD)
# V1_COMMIT: a commit whose toy_models/weights/toy-dit-base is the base the chain started from.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${1:?usage: ship.sh BASE_DIR TURBO_DIR V1_COMMIT}; T=${2:?turbo folder}; V1=${3:?the v1 commit}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
for pair in "$B:toy-dit-base" "$T:toy-dit-turbo4"; do
  src=${pair%%:*}; dst=toy_models/weights/${pair##*:}
  cp "$src/config.json" "$src/model.safetensors" "$src/training.json" "$dst/"
done
# provenance: the lineage's first --init is the v1 base, which the shipped folder no longer holds:
# record the commit that holds it
"$PY" - "$V1" <<'PY'
import json, sys
from pathlib import Path
v1 = sys.argv[1]
for name in ("toy-dit-base", "toy-dit-turbo4"):
    p = Path("toy_models/weights") / name / "training.json"
    tr = json.loads(p.read_text())
    if name == "toy-dit-base":
        first = tr  # the lineage's first stage: its --init is the v1 base
        while first.get("init_training"):
            first = first["init_training"]
        if not first.get("init"):
            sys.exit(f"{p}: the lineage's first stage has no --init (not a continuation of the v1 base)")
        first["init_commit"] = v1
    if tr.get("recipe") == "toy_models.recipes.distill":
        tr["base_shipped_as"] = "toy_models/weights/toy-dit-base"
    p.write_text(json.dumps(tr, indent=2) + "\n")
PY
time "$PY" -m toy_models.recipes.acceptance --n 256 --seed 0 --threads 2 --write-cards
