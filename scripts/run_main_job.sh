#!/usr/bin/env bash
# The main job in one command: install deepspeed-acco with the example dependencies, then train the
# tiny byte-level GPT-2 on the Python standard library with ACCO on 2 ranks (CPU/gloo unless a CUDA GPU
# is visible), and print where the metrics, summary and loss plot are.
#
#   bash scripts/run_main_job.sh                                  # 60 steps, ds_configs/acco.json, runs/main_job
#   CONFIG=ds_configs/zero1.json OUT=runs/zero1 bash scripts/run_main_job.sh     # the ZeRO-1 baseline
#   NUM_GPUS=8 PRESET=gpt2-125m MAX_STEPS=2000 bash scripts/run_main_job.sh --tokenizer bpe   # GPUs
#
# Extra arguments go to examples/train_lm.py (see `python examples/train_lm.py --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# torch first: on the project's CPU machines `torch==2.13.0` is the local CPU build; anything else
# would pull a CUDA build. Then the package itself with the examples' dependencies.
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[examples]"

if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu   # gloo backend, no GPU probing
fi
CONFIG=${CONFIG:-ds_configs/acco.json}
OUT=${OUT:-runs/main_job}
NUM_GPUS=${NUM_GPUS:-2}
MAX_STEPS=${MAX_STEPS:-60}
PRESET=${PRESET:-tiny}

python3 -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" examples/train_lm.py \
  --deepspeed_config "$CONFIG" --preset "$PRESET" --max_steps "$MAX_STEPS" --output_dir "$OUT" "$@"

python3 - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
share = s.get("exposed_comm_share")
print(f"held-out loss {s['initial_eval_loss']:.3f} -> {s['final_eval_loss']:.3f} after {s['steps']} steps, "
      f"{s['tokens_per_s']:,.0f} tokens/s, exposed communication "
      + (f"{share:.1%} of round time" if share is not None else "n/a (ACCO off)"))
PY
echo "metrics: $OUT/metrics.jsonl   summary: $OUT/summary.json   plot: $OUT/loss.png"
