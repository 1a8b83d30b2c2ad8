# Sourced by the C2C GPU scripts (c2c_variants.sh, c2c_reverse.sh): the environment, the transformers
# guard and the dequantised model copies they share. Defines `hf` (the folder holding both models as HF
# folders: $hf/smollm2 and $hf/gemma3, whichever direction a script trains), `eval_py` (the benchmark's
# command), `out` ($OUT or /tmp/out) and `extra` (C2C_EXTRA, e.g. "--device cpu --steps 2 --limit 4
# --batch-size 4" for a smoke run), and `train_step LOG`, the last "step/steps [time]" of a training log.
export PYTHONPATH=/tmp/tf:src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
hf=/root/models/hf
out=${OUT:-/tmp/out}
eval_py="${PYTHON:-python3} benchmarks/c2c_eval.py"
extra=${C2C_EXTRA:-}
mkdir -p "$out"
train_step() { tr '\r' '\n' < "$1" | grep -o '[0-9]*/[0-9]* \[[^]]*\]' | tail -1; }

# The pinned transformers, or nothing: the GPU machine's own 5.17 loads Gemma-3 from GGUF into a broken
# model, and the dequantised copies saved below would carry that into every later run without an error.
pinned=$(grep -o 'transformers==[0-9.]*' pyproject.toml | head -n 1 | cut -d= -f3)
have=$(${PYTHON:-python3} -c "import transformers; print(transformers.__version__)" 2>/dev/null)
if [ "$have" != "$pinned" ]; then
  echo "transformers $pinned (pyproject.toml) is needed first on PYTHONPATH, found '${have:-none}':" \
    "install the carried wheel into /tmp/tf (see benchmarks/gpu_stage.sh)" >&2
  exit 1
fi

# Dequantising the GGUF files takes about 26 s (SmolLM2) and 65 s (Gemma-3) on the GPU machine: once per
# machine, both models side by side, kept as HF copies for every later process. (Session 9, both models in
# one process: about 135 s from the call's start to the first training step. Side by side, session 10:
# about 80 s from the call's start until the training processes start, 95 s to their first step.)
if [ ! -f $hf/gemma3/config.json ] || [ ! -f $hf/smollm2/config.json ]; then
  mkdir -p /root/c2c-logs
  for gguf in smollm2-135m-instruct-q4_1.gguf gemma-3-270m-q4_k_m.gguf; do
    $eval_py --phases save-hf --receiver /root/models/$gguf --save-hf $hf --device cuda $extra \
      > /root/c2c-logs/save-$gguf.log 2>&1 &
  done
  wait
  if [ ! -f $hf/gemma3/config.json ] || [ ! -f $hf/smollm2/config.json ]; then
    tail -n 20 /root/c2c-logs/save-*.log; exit 1
  fi
fi
