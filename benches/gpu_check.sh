#!/usr/bin/env bash
# One-shot check of the fused kernel on a lent GPU (H100/H200), in under 8 minutes, without network access.
#
#   bash benches/gpu_check.sh            # from the repository root, on the GPU machine
#
# 1. installs the project without dependencies (the GPU image has torch, Triton, transformers, accelerate, click,
#    safetensors, numpy, pytest; math-verify, the one missing dependency, is only imported for grading). Wheels
#    placed in .whl/ are installed first, to a target folder on PYTHONPATH.
# 2. runs the kernel tests on the GPU: the `gpu`-marked ones (real vocabularies, CUDA graphs, offsets past 2^31, one
#    kernel per step) and the float64-referenced ones, which run compiled here instead of under the interpreter;
# 3. times the goal grid (bf16, V 151936, k 5, B 1-256: fused, eager, torch.compile, read-only roofline, copy; CUDA
#    graph replay and eager loop), a smaller sweep over other vocabularies, dtypes and k, and steer.generate against
#    generate on a 1B-class random Llama;
# 4. where vLLM is installed, runs the steered-vLLM tests on the V2 model runner;
# 5. writes everything under benches/results/ with the device's name: gpu-check-<device>.log (versions, test output,
#    tables, goals), kernel-<device>.json, kernel-sweep-<device>.json, generate-overhead-<device>.json.
#
# Every stage has its own time limit and the script goes on after a failure, so the results of the others land.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    $python -m pip install -q --no-index --no-deps --no-compile --target /tmp/steer-wheels .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/steer-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $python -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
    # An image whose setuptools cannot build an editable install: the same package layout from symbolic links.
    rm -rf /tmp/steer-shim && mkdir -p /tmp/steer-shim/steer
    ln -s "$PWD"/steer/* /tmp/steer-shim/steer/ && ln -s "$PWD/kernels" "$PWD/cli" /tmp/steer-shim/steer/
    export PYTHONPATH=/tmp/steer-shim${PYTHONPATH:+:$PYTHONPATH}
fi

slug=$($python -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))") \
    || { echo "no CUDA device"; exit 1; }
results=benches/results
log=$results/gpu-check-$slug.log
status=0
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local begin=$SECONDS
    timeout "$limit" "$@"
    local code=$?
    echo "== $name: exit $code after $((SECONDS - begin))s"
    [ "$code" -eq 0 ] || status=1
}

{
    echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo unknown) on $slug"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    $python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
                                                           'transformers', transformers.__version__)"
    stage "kernel tests on the GPU" 150 $python -m pytest -q -p no:cacheprovider tests/test_kernels.py \
        -k "not processor and not bench and not info and not dispatch and not generate_overhead"
    stage "goal grid" 170 $python benches/kernel.py --batch 1,4,8,32,256 --vocab 151936 --dtype bf16 --k 5 \
        --out "$results/kernel-$slug.json"
    stage "sweep" 60 $python benches/kernel.py --batch 1,256 --vocab 32000,262144 --dtype fp16,fp32 --k 1,16 \
        --rivals fused,read,copy --out "$results/kernel-sweep-$slug.json"
    stage "generate overhead" 70 $python benches/kernel.py --generate-overhead
    # vLLM's V2 model runner (the default on CUDA since vLLM 0.32) with steered models: the steered engine against
    # steer.generate, batching, the evaluation engine, and the per-request counter under V2's request slots.
    if $python -c "import vllm" 2>/dev/null; then
        stage "vLLM V2 runner, steered" 300 env VLLM_USE_V2_MODEL_RUNNER=1 $python -m pytest -q -p no:cacheprovider \
            tests/integrations/test_vllm.py -k "decodes_as_steer_generate or batching or eval_engine_vllm or counter"
    else
        echo "== vLLM V2 runner: skipped, vLLM is not installed (the GPU image lacks it, and its CUDA wheel is larger"
        echo "   than the 64 MiB a device run may carry)"
    fi
    echo "== done in ${SECONDS}s, status $status"
    exit "$status"
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
