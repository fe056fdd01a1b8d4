#!/usr/bin/env bash
# What to run on a leased GPU machine, in stages that each fit a 10-minute call.
#
#   bash benchmarks/gpu_lease.sh STAGE [STAGE ...]
#
# Three calls fit a 30-minute lease (each call at most 10 minutes, issued as soon as the previous
# one returns, while the machine is still warm):
#   1. setup tests graphs   2. setup steps   3. setup solver        (solver2 if time is left)
#
# Stages (minutes measured or expected on an H100 machine with 16 cores):
#   setup   install the wheels carried in .whl/ (tensordict, TorchJD and their dependencies;
#           the machine has torch but cannot reach PyPI) into /tmp/site
#   tests   the whole suite on CUDA, 15 workers (about 3 min)
#   solver  benchmarks/probe_cuda_qp.py's five variants at m = 8 and 128, the CUDA-graph ones
#           included (up to 8 min: each compiled variant compiles for 15-60 s)
#   solver2 PDAS instead of the enumeration at m = 8; compiled PDAS unrolled instead of a
#           while_loop at m = 32 and 128, with the eager profile (kernel launches, syncs)
#   steps   compiled steps only (MTL: mtl_gramian_step), with a long timeout (compiling took
#           55-100+ s per step; at most 9.5 min)
#   graphs  compiled MTL steps (mtl_gramian_step) with CUDA graphs (mode="reduce-overhead"; at
#           most 5 min)
#
# Everything is printed as it goes and also written under $OUT (default: gpu-out/), so that a run
# cut off by its time limit still returns what it measured. Wheels for the machine's Python 3.12:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     tensordict==0.15.3 pyvers==0.2.3 torchjd==0.18.0 qpsolvers==4.13.0 quadprog==0.1.14
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="/tmp/site:$PWD"

for stage in "$@"; do
    echo "=== $stage ($(date -u +%T))"
    case "$stage" in
    setup)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        python3 -c "import torch, tensordict; print('torch', torch.__version__, 'tensordict', tensordict.__version__)"
        ;;
    tests)
        timeout 280 env PYTEST_TORCH_DEVICE=cuda:0 python3 -m pytest -q -n 15 -p no:cacheprovider \
            -p no:benchmark --timeout 200 -rfE 2>&1 | tee "$out/tests_cuda.log" | tail -40
        ;;
    solver)
        timeout 500 python3 -m benchmarks.probe_cuda_qp --sizes 8 128 --no-profile 2>&1 \
            | grep -v Warning | tee "$out/solver.log"
        ;;
    solver2)
        timeout 150 python3 -m benchmarks.probe_cuda_qp --sizes 8 --variants eager compiled \
            --enumerate-max-cuda 6 --no-profile 2>&1 | grep -v Warning | tee "$out/solver_pdas8.log"
        timeout 300 python3 -m benchmarks.probe_cuda_qp --sizes 32 128 --variants compiled \
            --compiled-unroll 2>&1 | grep -v Warning | tee "$out/solver_unroll.log"
        ;;
    steps)
        timeout 560 python3 -m benchmarks.bench_steps --device cuda \
            --configs mtl-m8 iwrm-b32 iwrm-b128 iwmtl-b32-m4 mtl-m32 \
            --methods sgd jd-compiled --no-parts --repeats 20 --budget 4 --timeout 200 \
            --mtl-step gramian --out "$out/steps.md" 2>&1 | grep -v Warning | tee "$out/steps.log"
        ;;
    graphs)
        timeout 300 python3 -m benchmarks.bench_steps --device cuda --configs mtl-m2 mtl-m8 \
            --methods sgd jd-compiled --no-parts --repeats 20 --budget 4 --timeout 140 \
            --backend inductor:reduce-overhead --mtl-step gramian --out "$out/graphs.md" 2>&1 \
            | grep -v Warning | tee "$out/graphs.log"
        ;;
    *)
        echo "unknown stage $stage" >&2
        exit 2
        ;;
    esac
done
