#!/usr/bin/env bash
# C2C in the other direction: Gemma-3-270M (receiver) reads SmolLM2-135M-Instruct's cache (sharer), with
# the committed recipe (420 steps, batch 32, option objective weight 1, KL weight 1, context fusion), and
# its fair control (Gemma-3 as its own sharer); then all five methods on the three test sets, with latency.
#
#   bash benchmarks/c2c_reverse.sh SECONDS     # stop after SECONDS; re-running continues where it stopped
#
# The two fusers train in parallel processes (resumable: state every 25 steps); evaluation rewrites its
# results after every method and test set and skips what a previous call finished. Leaves in $OUT:
# reverse-results.json, gemma3-from-smollm2.safetensors and gemma3-control-self.safetensors (once both
# exist) and reverse-logs.tar.gz. Then, here: c2c_eval.py --phases report --results FILE --section c2c-reverse.
# Training stops C2C_EVAL_RESERVE seconds (default 200) before the end to leave time for the evaluation.
#
# Needs what c2c_variants.sh needs (benchmarks/_c2c_gpu.sh): the pinned transformers first on PYTHONPATH,
# the GGUF models under /root/models, the data under /root/c2cdata.
set -u
budget=${1:?usage: c2c_reverse.sh SECONDS}
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
source benchmarks/_c2c_gpu.sh  # environment, transformers guard, dequantised copies under $hf
rev=/root/c2c-reverse
mkdir -p $rev
args="--receiver $hf/gemma3 --sharer $hf/smollm2 --data /root/c2cdata --checkpoint-dir /nonexistent
      --device cuda --batch-size 32 --mc-weight 1 --steps 420 --distill-weight 1 $extra"
reserve=${C2C_EVAL_RESERVE:-200}

for m in c2c control; do
  [ -f $rev/$m.safetensors ] && continue
  ( timeout $(( $(left) - reserve )) $eval_py $args --methods $m --phases train --out $rev/train-$m \
      --state-dir $rev/state > $rev/$m.train.log 2>&1
    [ -f $rev/train-$m/$m.safetensors ] && cp $rev/train-$m/$m.safetensors $rev/ ) &
done
while [ -n "$(jobs -r)" ]; do
  sleep 30
  echo "[$(date +%T)] $(for m in c2c control; do printf '%s: %s  ' $m "$(train_step $rev/$m.train.log)"; done)"
done
if [ -f $rev/c2c.safetensors ] && [ -f $rev/control.safetensors ] && [ "$(left)" -gt 40 ]; then
  # A copy of the results every 15 s: a call cut off by its device time still brings back what finished.
  ( while sleep 15; do cp $rev/results.json $out/reverse-results.json 2>/dev/null; done ) &
  copier=$!
  timeout $(( $(left) - 20 )) $eval_py $args --phases eval --out $rev > $rev/eval.log 2>&1
  kill $copier
  tail -n 25 $rev/eval.log
  cp $rev/c2c.safetensors $out/gemma3-from-smollm2.safetensors
  cp $rev/control.safetensors $out/gemma3-control-self.safetensors
fi
$eval_py --phases fold --out $rev > /dev/null && cp $rev/results.json $out/reverse-results.json
tar -czf $out/reverse-logs.tar.gz -C $rev $(cd $rev && ls *.log)
