# Sourced by the C2C GPU scripts (c2c_variants.sh, c2c_reverse.sh): the environment, the transformers
# guard and the dequantised model copies they share. Defines `hf` (the folder holding both models as HF
# folders: $hf/smollm2 and $hf/gemma3, whichever direction a script trains), `eval_py` (the benchmark's
# command), `out` ($OUT or /tmp/out) and `extra` (C2C_EXTRA, e.g. "--device cpu --steps 2 --limit 4
# --batch-size 4" for a smoke run).
export PYTHONPATH=/tmp/tf:src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
hf=/root/models/hf
out=${OUT:-/tmp/out}
eval_py="${PYTHON:-python3} benchmarks/c2c_eval.py"
extra=${C2C_EXTRA:-}
mkdir -p "$out"

# The pinned transformers, or nothing: the GPU machine's own 5.17 loads Gemma-3 from GGUF into a broken
# model, and the dequantised copies saved below would carry that into every later run without an error.
pinned=$(grep -o 'transformers==[0-9.]*' pyproject.toml | head -n 1 | cut -d= -f3)
have=$(${PYTHON:-python3} -c "import transformers; print(transformers.__version__)" 2>/dev/null)
if [ "$have" != "$pinned" ]; then
  echo "transformers $pinned (pyproject.toml) is needed first on PYTHONPATH, found '${have:-none}':" \
    "install the carried wheel into /tmp/tf (see benchmarks/gpu_stage.sh)" >&2
  exit 1
fi

# Dequantising both GGUF files takes about 73 s: do it once per machine and keep HF copies.
if [ ! -f $hf/gemma3/config.json ]; then
  mkdir -p /root/c2c-logs
  $eval_py --receiver /root/models/smollm2-135m-instruct-q4_1.gguf --sharer /root/models/gemma-3-270m-q4_k_m.gguf \
    --data /root/c2cdata --checkpoint-dir /nonexistent --device cuda --save-hf $hf --phases eval \
    --methods receiver --limit 1 --latency-n 0 --out /tmp/c2c-load $extra > /root/c2c-logs/load.log 2>&1 \
    || { tail -20 /root/c2c-logs/load.log; exit 1; }
fi
