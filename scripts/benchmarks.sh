#!/usr/bin/env bash
# Regenerate Docs/benchmarks.md: every section, with the arguments its numbers were recorded with.
# Each script replaces only its own section (between <!-- key:begin --> and <!-- key:end -->) and names the
# machine it ran on. Long on a CPU (memory + baselines-64 alone: 14 minutes on 2 cores). Run one section by
# passing its key, e.g.
#   bash scripts/benchmarks.sh memory baselines-64
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c "import itk; itk.elastix_registration_method" 2>/dev/null \
    || .venv/bin/python -m pip install --quiet -e ".[benchmark]"  # the itk-elastix baseline
export PYTHONPATH="IterativeRegistration:Training:Testing${PYTHONPATH:+:$PYTHONPATH}"
export QT_QPA_PLATFORM=offscreen
PY=.venv/bin/python

declare -A SECTIONS=(
    [baselines-64]="Testing/benchmark_baselines.py --size 64 --pairs 4 --first-seed 200"
    [baselines-96]="Testing/benchmark_baselines.py --size 96 --pairs 3 --first-seed 200"
    [baselines-128]="Testing/benchmark_baselines.py --size 128 --pairs 3 --first-seed 200"
    [memory]="Testing/benchmark_memory.py --sizes 48 96"
    [worker]="Testing/benchmark_worker.py --steps 30"
    [scene]="Testing/benchmark_scene_updates.py --steps 20"
    [riir-deqreg-memory]="Testing/benchmark_riir_deqreg.py memory --size 64"
    [riir-deqreg-convergence]="Testing/benchmark_riir_deqreg.py convergence --size 64 --pairs 3 --first-seed 200"
    [riir-deqreg-convergence-2d]="Testing/benchmark_riir_deqreg.py convergence --ndim 2 --size 128 --pairs 8 --first-seed 200"
    [riir-deqreg-working-grid]="Testing/benchmark_riir_deqreg.py working-grid --sizes 64 128 --pairs 3 --first-seed 200"
    [iirp-iterstop]="Testing/benchmark_iirp_r2n2.py iterstop"
    [dio-accuracy]="Testing/benchmark_dio.py accuracy"
    [dio-prompts]="Testing/benchmark_dio.py prompts --prompt-max-radius 40"
    [dio-robustness]="Testing/benchmark_dio.py robustness"
    [thick-slices]="Testing/benchmark_thick_slices.py --size 128 --pairs 3 --thickness 3 5"
    [thick-slices-real]="Testing/benchmark_thick_slices.py --real --size 128 --thickness 3 5"  # Colin27 too
    [dio-smoothing]="Testing/benchmark_dio.py smoothing --with-3d"
    [r2n2-localisation]="Testing/benchmark_iirp_r2n2.py localisation"
    [r2n2-compactness]="Testing/benchmark_iirp_r2n2.py compactness"
    [r2n2-compactness-3d]="Testing/benchmark_iirp_r2n2.py compactness --ndim 3 --size 64 --pairs 3"
    [r2n2-series]="Testing/benchmark_iirp_r2n2.py series"
    [real-pair]="Testing/benchmark_real_pair.py --size 128 --draws 10"  # fetches Colin27 (mricron-data) once
    [prompt-models]="Testing/benchmark_prompt_models.py --size 128 --pairs 4 --draws 10"  # Colin27 too
    [r2n2-compactness-local]="Testing/benchmark_iirp_r2n2.py compactness --region-mm 15 --checkpoint Resources/Checkpoints/r2n2_mni128_2d_local.safetensors"
    [r2n2-compactness-3d-local]="Testing/benchmark_iirp_r2n2.py compactness --ndim 3 --size 64 --pairs 3 --region-mm 30 --local-magnitude-mm 12"
    [r2n2-step-size]="Testing/benchmark_iirp_r2n2.py step-size"
    [cpu-layout]="Testing/benchmark_cpu_layout.py --size 128 --repeats 3"
    [cpu-allocator]="Testing/benchmark_cpu_allocator.py --size 128 --repeats 3"
    [gpu-times]="Testing/benchmark_gpu.py --size 128 --pairs 2 --repeats 5"  # needs a CUDA device: not in ORDER
    [precision]="Testing/benchmark_precision.py --size 128 --pairs 3"  # needs native bfloat16: not in ORDER
)
ORDER=(baselines-64 memory worker scene riir-deqreg-memory riir-deqreg-convergence riir-deqreg-convergence-2d
       riir-deqreg-working-grid
       iirp-iterstop dio-accuracy dio-smoothing dio-prompts dio-robustness thick-slices thick-slices-real
       r2n2-localisation
       r2n2-compactness
       r2n2-compactness-3d r2n2-compactness-local r2n2-compactness-3d-local r2n2-step-size
       r2n2-series baselines-96 baselines-128 real-pair prompt-models cpu-layout cpu-allocator)

keys=("$@")
[ ${#keys[@]} -eq 0 ] && keys=("${ORDER[@]}")
for key in "${keys[@]}"; do
    if [ -z "${SECTIONS[$key]+x}" ]; then
        echo "unknown section '$key'; choose from: ${ORDER[*]}" >&2
        exit 2
    fi
    echo "== $key: $PY ${SECTIONS[$key]}"
    # shellcheck disable=SC2086  # the arguments are meant to split
    $PY ${SECTIONS[$key]}
done
