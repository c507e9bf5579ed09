#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests, then `m2das bench train` over
# precisions, batch sizes and torch.compile, each result a JSON record.
# Prepare on the CPU machine first (the device machine has torch but not these):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl submitit soundfile soxr cloudpickle
# then run this script there with `.whl` carried; copy $OUT/results into bench/results/.
set -euo pipefail
out="${OUT:-bench}/results"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps -e .
device="$(python3 -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$out/gpu-$device.txt"
python3 -m pytest -m cuda tests/test_cuda.py -v -s 2>&1 | tee "$out/cuda-tests-$device.log" || true
for precision in bf16 fp16; do
    for batch in 64 128 256 512; do
        for compile in "" "--compile"; do
            tag="train-$device-$precision-b$batch${compile:+-compile}"
            python3 -m m2das bench train --precision "$precision" --batch_size "$batch" $compile \
                --steps 20 --warmup 5 --json "$out/$tag.json" 2>&1 | tail -n 3 || echo "$tag failed (out of memory?)"
        done
    done
done
python3 -m m2das bench data 2>&1 | tee "$out/data-$device.txt" || true
