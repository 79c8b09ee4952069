#!/usr/bin/env bash
# The GPU benchmark of docs/benchmarks.md in one call: the step benchmark of the issue's
# goals (ViT-g/14, 518 px, loss at block 25, TF32 and bf16; fast, --compile and naive steps,
# the memory ledger, the attention kernel) and the demo repair in fp32,
# tf32 and bf16 (the effect of the precision on the result), then the end-to-end run
# (tools/bench_full.py: a planted-defect ViT-g/14 at 518 px, repaired on FULL_IMAGES
# generated JPEGs, each processed once; killed after FULL_TIMEOUT seconds).
#
#   bash tools/bench_gpu.sh [RESULTS_DIR]        # RESULTS_DIR defaults to ./bench-gpu
#
# MODEL, RES, BLOCK, SAMPLES, PRECISIONS, DEMO_ARGS override the sizes (a small dry run on
# a CPU: MODEL=vit_small_patch14_dinov2 RES=224 BLOCK=11 SAMPLES=2000 PRECISIONS=fp32 ...).
# FULL_IMAGES (default 2000: about 2 minutes of training at the ViT-g step times measured
# so far), FULL_TIMEOUT (default 480 s) and FULL_ARGS (more bench_full.py flags, e.g. the
# tiny size --depth 6 --width 192 --planted-block 3 --resolution 224 --directions-method
# expected) size the end-to-end run; FULL_IMAGES=0 skips it. FULL_COMPILE_IMAGES (default
# 1000; 0 skips it) repeats the end-to-end run with --compile.
set -euo pipefail
results=${1:-bench-gpu}
mkdir -p "$results"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$python -c "import torch, timm, transformers, accelerate; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"

$python tools/bench_repair.py --model "${MODEL:-vit_giant_patch14_dinov2}" --no-pretrained --resolution "${RES:-518}" \
    --loss-block "${BLOCK:-25}" --samples "${SAMPLES:-100000}" --precision ${PRECISIONS:-tf32 bf16} --json \
    | tee "$results/bench_repair.jsonl"

# the singular vectors of the directions alone, per block: Lanczos steps and dense fallbacks
$python tools/bench_directions.py --model "${MODEL:-vit_giant_patch14_dinov2}" --no-pretrained --chain-only \
    --device "$($python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')" \
    --samples "${SAMPLES:-100000}" --repeats 3 | tee "$results/bench_directions.txt"

for precision in fp32 tf32 bf16; do
    $python tools/demo.py --output "/tmp/sinder-demo-$precision" --precision "$precision" --quiet ${DEMO_ARGS:-} \
        > "$results/demo_$precision.txt"
    tail -n 4 "$results/demo_$precision.txt"
done

# how far the tf32 and bf16 repairs land from the fp32 one (ε and the merged weights)
$python - "$results" <<'EOF'
import json, sys
import torch
from safetensors.torch import load_file

results = sys.argv[1]
runs = {p: f"/tmp/sinder-demo-{p}/run" for p in ("fp32", "tf32", "bf16")}
eps = {p: torch.load(f"{d}/checkpoint/state.pt", weights_only=True)["eps"] for p, d in runs.items()}
weights = {p: load_file(f"{d}/model.safetensors") for p, d in runs.items()}
reports = {p: json.load(open(f"{d}/repair_report.json")) for p, d in runs.items()}
table = {}
for p in ("tf32", "bf16"):
    a = torch.cat([eps[p][k].flatten() for k in sorted(eps[p])])
    b = torch.cat([eps["fp32"][k].flatten() for k in sorted(eps["fp32"])])
    w = (sum(float((weights[p][k] - weights["fp32"][k]).square().sum()) for k in weights[p])
         / sum(float(weights["fp32"][k].square().sum()) for k in weights[p])) ** 0.5
    table[p] = {"eps_rel_diff_to_fp32": float((a - b).norm() / b.norm()), "weights_rel_diff_to_fp32": w}
for p, report in reports.items():
    held = report["held_out"]
    table.setdefault(p, {}).update(steps=report["steps"], updates=report["updates"], defects_before=held["before"]["total"],
                                   defects_after=held["after"]["total"], normal_cos=held["normal_token_cosine"],
                                   class_cos=held["class_token_cosine"], wall_s=report["wall_time_s"])
print(json.dumps(table, indent=1))
json.dump(table, open(f"{results}/demo_precisions.json", "w"), indent=1)
EOF

# the end-to-end run last: what it costs depends on the card, and a timeout here keeps the results above
if [ "${FULL_IMAGES:-2000}" != 0 ]; then
    timeout "${FULL_TIMEOUT:-480}" $python tools/bench_full.py --num-images "${FULL_IMAGES:-2000}" --quiet \
        --json "$results/bench_full.json" ${FULL_ARGS:-} | tee "$results/bench_full.txt" \
        || echo "bench_full.py failed or ran past ${FULL_TIMEOUT:-480} s (exit ${PIPESTATUS[0]})"
fi
if [ "${FULL_COMPILE_IMAGES:-1000}" != 0 ]; then
    timeout "${FULL_TIMEOUT:-480}" $python tools/bench_full.py --num-images "${FULL_COMPILE_IMAGES:-1000}" --compile --quiet \
        --json "$results/bench_full_compile.json" ${FULL_ARGS:-} | tee "$results/bench_full_compile.txt" \
        || echo "bench_full.py --compile failed or ran past ${FULL_TIMEOUT:-480} s (exit ${PIPESTATUS[0]})"
fi
