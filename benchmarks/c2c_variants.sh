#!/usr/bin/env bash
# C2C recipe variants, side by side on one GPU, chosen on the dev sets (never on test).
#
# Each variant trains its C2C fuser and its fair control (same recipe, the receiver as its own sharer) in
# parallel processes; all of them evaluate on the ARC-Easy / ARC-Challenge / OpenBookQA *dev* splits and
# the test splits; the variant with the largest C2C − control on ARC-Easy dev is the chosen one, and its
# two checkpoints go to $OUT with every variant's results. Re-running continues where a run stopped
# (training resumes from its state every 25 steps; finished fusers and evaluations are kept), so the
# work can span several calls on a warm GPU machine:
#
#   bash benchmarks/c2c_variants.sh SECONDS     # stop launching/evaluating after SECONDS
#
# Training stops C2C_EVAL_RESERVE seconds (default 150) before the end, leaving time to evaluate what
# finished; C2C_VARIANTS picks the variants (default: all below); C2C_BASE is the folder holding the
# committed pair (default checkpoints/c2c; a carried copy when the tree travels without checkpoints);
# C2C_PARALLEL (default 3) caps how many variants run at once.
#
# Needs: transformers (pinned) on PYTHONPATH, the GGUF models under /root/models (../shared/gpu/README.md)
# and the data under /root/c2cdata. The first run keeps dequantised copies under /root/models/hf.
set -u
budget=${1:?usage: c2c_variants.sh SECONDS}
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
runs=/root/c2c-variants
mkdir -p "$runs"
source benchmarks/_c2c_gpu.sh  # environment, transformers guard, dequantised copies under $hf
common="--receiver $hf/smollm2 --sharer $hf/gemma3 --data /root/c2cdata --checkpoint-dir /nonexistent
        --device cuda --batch-size 32 --mc-weight 1"
# name → recipe (everything else as in `common`); "base" is the committed pair (seed 0, 420 steps).
declare -A recipe=(
  [base]="--steps 420 --distill-weight 1"
  [seed1]="--steps 420 --distill-weight 1 --seed 1"
  [seed2]="--steps 420 --distill-weight 1 --seed 2"
  [seed3]="--steps 420 --distill-weight 1 --seed 3"
  [long]="--steps 840 --distill-weight 1"
  [distill3]="--steps 420 --distill-weight 3"
  [mconly]="--steps 520 --distill-weight 1 --instructions 0"
  [mconly3]="--steps 520 --distill-weight 3 --instructions 0"
  [allmc]="--steps 420 --distill-weight 1 --fuse-span all"
  [mean]="--steps 420 --distill-weight 1 --token-alignment mean"
  [ownpos]="--steps 420 --distill-weight 1 --sharer-positions own"
  # the fuser's structure, each as large as the 16 MB cap allows: every receiver layer fused (30 layers,
  # width 152: 14.7 MB), or the committed 18 layers at width 240 (15.4 MB)
  [uniform]="--steps 420 --distill-weight 1 --layer-map uniform --hidden 152"
  [uniform1]="--steps 420 --distill-weight 1 --layer-map uniform --hidden 152 --seed 1"
  [wide]="--steps 420 --distill-weight 1 --hidden 240"
)
names=${C2C_VARIANTS:-"base seed1 seed2 seed3 long distill3 mconly mconly3 allmc mean ownpos uniform uniform1 wide"}
reserve=${C2C_EVAL_RESERVE:-150}

mkdir -p $runs/base
[ -f $runs/base/c2c.safetensors ] || cp ${C2C_BASE:-checkpoints/c2c}/smollm2-from-gemma3.safetensors $runs/base/c2c.safetensors
[ -f $runs/base/control.safetensors ] || cp ${C2C_BASE:-checkpoints/c2c}/smollm2-control-self.safetensors $runs/base/control.safetensors

# Each variant is one pipeline: its two fusers train in parallel processes (each writes its own results
# file, merged at the end), then the pair evaluates on dev, then test (no latency; the chosen pair's is
# measured later), while other variants may still be training.
variant() {
  local v=$1 m split
  mkdir -p $runs/$v && echo "${recipe[$v]}" > $runs/$v/recipe.txt  # for c2c_eval.py --phases merge
  for m in c2c control; do
    [ -f $runs/$v/$m.safetensors ] && continue
    ( timeout $(( $(left) - reserve )) $eval_py $common ${recipe[$v]} $extra --methods $m --phases train \
        --out $runs/$v/train-$m --state-dir $runs/state/$v > $runs/$v.$m.train.log 2>&1
      [ -f $runs/$v/train-$m/$m.safetensors ] && cp $runs/$v/train-$m/$m.safetensors $runs/$v/ ) &
  done
  wait
  [ -f $runs/$v/c2c.safetensors ] && [ -f $runs/$v/control.safetensors ] || return 0
  for split in dev test; do
    [ -f $runs/$v/$split.done ] && continue
    [ "$(left)" -gt 60 ] || return 0
    timeout $(( $(left) - 30 )) $eval_py $common ${recipe[$v]} $extra --methods c2c,control --phases eval \
      --split $split --latency-n 0 --out $runs/$v > $runs/$v.eval-$split.log 2>&1 && touch $runs/$v/$split.done
  done
}
progress() {  # wait up to 30 s (less when every job has ended), then print each training's progress
  for _ in 1 2 3 4 5 6; do sleep 5; [ -n "$(jobs -r)" ] || return 0; done
  echo "[$(date +%T)] $(for v in $names; do for m in c2c control; do f=$runs/$v.$m.train.log
    [ -f $f ] && printf '%s: %s  ' "$v.$m" "$(train_step $f)"
  done; done)"
}
# At most C2C_PARALLEL variants (two training processes each) at a time: 8 processes outgrew the H100's
# 80 GB (out of memory at a 4.6 GiB option-scoring step); 6 fit with 18 fused layers, but not with two
# 30-layer (uniform) variants among them (two ran out of memory; rerunning resumes them).
for v in $names; do
  while [ "$(jobs -rp | wc -l)" -ge "${C2C_PARALLEL:-3}" ]; do progress; done
  variant $v &
done
while [ -n "$(jobs -r)" ]; do progress; done

for v in $names; do [ -d $runs/$v ] && $eval_py --phases fold --out $runs/$v > /dev/null; done
${PYTHON:-python3} - "$runs" "$out" $names <<'EOF'
import json, shutil, sys, tarfile
from pathlib import Path
runs, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
gaps = {}
for v in names:
    f = runs / v / "results.json"
    if not f.is_file():
        continue
    r = json.loads(f.read_text())
    dev = r.get("dev_accuracy", {})
    if "arc_easy" in dev.get("c2c", {}) and "arc_easy" in dev.get("control", {}):
        gaps[v] = 100 * (dev["c2c"]["arc_easy"]["acc"] - dev["control"]["arc_easy"]["acc"])
    print(v, json.dumps({k: {m: round(100 * x[m]["arc_easy"]["acc"], 1) for m in x if "arc_easy" in x[m]}
                         for k, x in r.items() if k in ("dev_accuracy", "accuracy")}))
print("ARC-Easy dev C2C − control:", {v: round(g, 2) for v, g in gaps.items()})
with tarfile.open(out / "variants.tar.gz", "w:gz") as tar:
    for p in sorted(runs.glob("*/results.json")) + sorted(runs.glob("*/recipe.txt")) + sorted(runs.glob("*.log")):
        tar.add(p, arcname=str(p.relative_to(runs)))
if gaps:
    best = max(gaps, key=lambda v: gaps[v])
    print("chosen on ARC-Easy dev:", best)
    (out / "chosen.txt").write_text(best + "\n")
    if best != "base":
        for m in ("c2c", "control"):
            shutil.copy(runs / best / f"{m}.safetensors", out / f"{best}-{m}.safetensors")
EOF
