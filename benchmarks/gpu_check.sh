#!/usr/bin/env bash
# GPU check (issue 12): short sft, dpo and ppo runs on one GPU with bf16 and the default attention
# kernel, each under DeepSpeed ZeRO-3 (one process). Prints tokens/s, peak GPU memory and MFU against the GPU's bf16 dense peak.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (PEAK_TFLOPS=989 for an H100/H200 SXM by default)
#
# STATUS: written without a GPU (none was lent to the task that wrote it); never run. Token counts
# are an upper bound (steps x global batch x max_length: padding and prompt tokens included), so
# tokens/s and MFU are upper bounds too; wall time includes start-up and evaluation, which pulls
# them down. Read the numbers as a smoke test, not a benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
PY=${PY:-.venv/bin/python}
ACCEL=${ACCEL:-.venv/bin/accelerate}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
mkdir -p "$OUT"
$PY -m rlhfkit data sentiment "$OUT/data" > /dev/null

common="report_to=[] disable_tqdm=true bf16=true logging_steps=5 max_steps=30 overwrite_output_dir=true"
run() {  # name, launcher..., -- rlhfkit args
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/$name.mem" &
  local smi=$!
  local t0=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1 || { kill $smi; echo "$name failed: see $OUT/$name.log"; return 1; }
  local t1=$(date +%s.%N)
  kill $smi
  echo "$name $(echo "$t1 - $t0" | bc)" >> "$OUT/times.txt"
}
rm -f "$OUT/times.txt"
Z3="$ACCEL launch --config_file configs/accelerate/zero3.yaml --num_processes 1 -m rlhfkit"
run sft $Z3 sft configs/sft_sentiment.yaml model_name_or_path=preset:smollm2-135m \
  dataset="$OUT/data/sft_train.jsonl" eval_dataset=null output_dir="$OUT/sft" max_length=128 \
  per_device_train_batch_size=32 gradient_accumulation_steps=1 task=null eval_steps=null $common
run dpo $Z3 dpo configs/dpo_sentiment.yaml model_name_or_path="$OUT/sft" \
  dataset="$OUT/data/preference_train.jsonl" eval_dataset=null output_dir="$OUT/dpo" max_length=128 \
  per_device_train_batch_size=16 gradient_accumulation_steps=1 task=null eval_steps=null $common
run ppo $Z3 ppo configs/ppo_sentiment.yaml model_name_or_path="$OUT/sft" reward_model=null \
  reward_funcs=[gold] task=sentiment dataset="$OUT/data/prompt_train.jsonl" output_dir="$OUT/ppo" \
  rollout_batch_size=64 $common

$PY - "$OUT" "$PEAK_TFLOPS" <<'EOF'
import json, sys
from pathlib import Path
out, peak = Path(sys.argv[1]), float(sys.argv[2]) * 1e12
times = dict(line.split() for line in (out / "times.txt").read_text().splitlines())
print(f"{'stage':6s} {'engine':7s} {'tokens/s<=':>11s} {'peak GiB':>9s} {'MFU<=':>7s}")
for stage, seconds in times.items():
    cfg = __import__("yaml").safe_load((out / stage / "config.yaml").read_text())
    summary = json.loads((out / stage / "summary.json").read_text())
    steps = summary["steps"]
    if stage == "ppo":  # episodes x (prompt + response) tokens, x (ppo epochs) passes
        tokens = steps * cfg["rollout_batch_size"] * (cfg["max_prompt_length"] + cfg["max_new_tokens"]) * cfg["num_ppo_epochs"]
        sequences = 1
    else:
        tokens = steps * cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"] * cfg["max_length"]
        sequences = 2 if stage == "dpo" else 1  # chosen + rejected
    tokens *= sequences * summary.get("world_size", 1)
    from safetensors import safe_open
    params = 0
    for f in (out / stage).glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            params += sum(__import__("math").prod(h.get_slice(k).get_shape()) for k in h.keys())
    mem = max((int(x) for x in (out / f"{stage}.mem").read_text().split() if x.isdigit()), default=0) / 1024
    tps = tokens / float(seconds)
    print(f"{stage:6s} {summary.get('engine', '?'):7s} {tps:11.0f} {mem:9.1f} {6 * params * tps / peak:7.1%}")
EOF
