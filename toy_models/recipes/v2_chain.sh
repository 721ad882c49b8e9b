#!/usr/bin/env bash
# Toy world v2: the whole continuation chain behind the candidate weights, one command.
#
#   bash toy_models/recipes/v2_chain.sh            # or: make weights-v2
#
# Each stage continues the previous one (`--init`); the first continues the v1 base
# (toy_models/weights/toy-dit-base as shipped up to the v2 weights). Every stage is a recipe
# command from docs/results/toy_world_v2.md with its seed. The chain is resumable: a finished
# stage (marker RUNS/<stage>.done) is skipped, an interrupted one resumes from its state.pt.
# Wall-clocks on the 2-core CPU machine: about 13-17 min per 3000 pre-training steps, 16-20 min
# for the distillation, 2 min for acceptance; about 2 h in all.
#
# Environment: RUNS (default runs), PYTHON (default .venv/bin/python if present, else python),
# INIT (default toy_models/weights/toy-dit-base: must be the v1 base), STOP_AFTER (a stage name),
# DRY_RUN=1 (print each stage's command, run nothing; tests/toy/test_v2_chain.py reads it).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
INIT=${INIT:-toy_models/weights/toy-dit-base}

# The chain adds 2-D RoPE to a model without it: the first --init must be the v1 base.
if [ -z "${DRY_RUN:-}" ] && [ ! -f "$RUNS/copy3-base.done" ] && grep -Eq '"rope": *true' "$INIT/config.json"; then
    echo "INIT=$INIT has RoPE already (the shipped v2 base?): the chain starts from the v1 base. Restore it with" \
         "mkdir -p runs/v1-base && for f in config.json model.safetensors training.json; do" \
         "git show 770a9a2:toy_models/weights/toy-dit-base/\$f > runs/v1-base/\$f; done" \
         "and run again with INIT=runs/v1-base" >&2; exit 2
fi

STAGES=()
stage() {  # name command...: run a stage unless its marker exists (DRY_RUN: print it; LISTING: list it)
    local name=$1; shift
    if [ -n "${LISTING:-}" ]; then STAGES+=("$name"); return; fi
    if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; return; fi
    if [ -f "$RUNS/$name.done" ]; then
        echo "== $name: done"
    else
        echo "== $name"
        "$PY" "$@"
        touch "$RUNS/$name.done"
    fi
    if [ "${STOP_AFTER:-}" = "$name" ]; then echo "stopped after $name"; exit 0; fi
}

pretrain() {  # stage mixture init steps warmup seed
    local stage=$1 mix=$2 init=$3 steps=$4 warmup=$5 seed=$6 resume=()
    [ -f "$RUNS/$stage/state.pt" ] && [ -z "${DRY_RUN:-}" ] && resume=(--resume)
    stage "$stage" -m toy_models.recipes.pretrain --mixture "$mix" --rope --init "$init" --out "$RUNS/$stage" \
        --steps "$steps" --warmup "$warmup" --lr 3e-4 --ckpt-every 500 --threads 2 --seed "$seed" --state "$RUNS/$stage/state.pt" ${resume[@]+"${resume[@]}"}
}

main() {
    [ -n "${DRY_RUN:-}${LISTING:-}" ] || mkdir -p "$RUNS"
    pretrain copy3-base copy "$INIT" 3000 200 12            # relocating copy: all translated glyph pairs
    pretrain c3d-base v2d "$RUNS/copy3-base" 3000 200 13     # + domains, fills, text-only
    pretrain c3d2-base v2d "$RUNS/c3d-base" 1500 100 14
    pretrain c3e-base v2e "$RUNS/c3d2-base" 3000 100 15      # glyph share of v2c, domain share of v2d
    pretrain c3f-base v2f "$RUNS/c3e-base" 3000 100 16       # no aligned references
    pretrain c3g-base v2g "$RUNS/c3f-base" 3000 100 17       # more glyph pairs
    pretrain c3h-base v2g "$RUNS/c3g-base" 3000 100 18
    pretrain c3i-base v2h "$RUNS/c3h-base" 3000 100 20       # every known-shape reference captioned sks
    stage c3i-turbo4 -m toy_models.recipes.distill --base "$RUNS/c3i-base" --out "$RUNS/c3i-turbo4" --threads 2 \
        --seed 0 --n-text 1536 --n-ref 3072 --train-steps 2500 --guidance 3 --negative concept_token --mixture v2h \
        --ref-aligned 0.0 --cache "$RUNS/c3i-distill/cache.pt"  # guidance distillation, w = 3, concept-token c⁻
    stage c3i-acceptance -m toy_models.recipes.acceptance --base "$RUNS/c3i-base" --turbo "$RUNS/c3i-turbo4" \
        --n 256 --seed 0 --threads 2 --out "$RUNS/c3i-acceptance.json"
}

# The stage names come from main itself (a listing pass), so STOP_AFTER is checked before anything runs.
# One line, read whole before it runs: editing this file while a chain runs cannot derail it.
LISTING=1 main; if [ -n "${STOP_AFTER:-}" ] && [[ " ${STAGES[*]} " != *" $STOP_AFTER "* ]]; then echo "STOP_AFTER=$STOP_AFTER is not a stage; stages: ${STAGES[*]}" >&2; exit 2; fi; main "$@"; exit $?
