#!/usr/bin/env bash
# On the GPU machine (device tool): install the carried wheels, run the GPU tests, benchmark.
# Usage: bash benchmarks/gpu_run.sh [tests|bench|all|sweep|model|pytest|train|demo|gluon|quality|treetests|compare|profile|hostprofile|breakdown] [extra args for the script or pytest; treetests, compare, profile: tree names]
set -uo pipefail
what=${1:-all}; shift || true
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
# FlashAttention-4 travels in three carried folders, one per call on a warm machine (.fa4a, .fa4b,
# .fa4c: the 92 MB cutlass wheel split in three, so that each call stays under 64 MiB with the tree)
for part in .fa4a .fa4b .fa4c; do
  if [ -d $part ] && [ ! -d /tmp/fa4site/flash_attn ]; then mkdir -p /tmp/fa4parts && cp $part/* /tmp/fa4parts/; fi
done
if [ -f /tmp/fa4parts/cu13part_ac ] && [ -f /tmp/fa4parts/cu13part_aa ] && [ ! -d /tmp/fa4site/flash_attn ]; then
  (cd /tmp/fa4parts && cat cu13part_aa cu13part_ab cu13part_ac > nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl && rm cu13part_* \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa4site ./*.whl) || echo "FA4 install failed"
fi
if [ -d /tmp/fa4site/flash_attn ]; then
  export PYTHONPATH=$PYTHONPATH:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages
fi
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
out=${OUT:-/tmp/out}; mkdir -p "$out"
tree_args() { for name in "$@"; do echo "$name=.trees/$name/src"; done; }  # compare, profile: NAME -> LABEL=PATH
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; from rainfusion.kernels.fa4 import fa4_available as f; print('torch', torch.__version__, 'triton', triton.__version__, 'fa4', f())"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 420 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/ 2>&1 | tail -25
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/core/test_attention.py -k triton 2>&1 | tail -3
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 540 python3 benchmarks/attention.py --out "$out/attention.json" "$@" 2>&1 | grep -v Warning | tail -60
fi
if [ "$what" = sweep ]; then
  (cd benchmarks && timeout 400 python3 kernel_sweep.py "$@" 2>&1 | grep -v Warning | tail -40)
fi
if [ "$what" = model ]; then
  (cd benchmarks && timeout 560 python3 model_step.py --out "$out/model_step.json" "$@" 2>&1 | grep -v Warning | tail -40)
fi
if [ "$what" = train ]; then  # the demo model (issue 5): checkpoint, log and preview come back in $OUT
  PYTHONUNBUFFERED=1 timeout 590 python3 -m rainfusion.tools.demo.training --out "$out/demo.safetensors" \
    --preview "$out/preview.png" "$@" 2>&1 | grep -v Warning | tail -30
  cp "$out/demo.safetensors" /tmp/demo-last.safetensors  # a warm machine's next call can --init from it
fi
if [ "$what" = demo ]; then  # the demo's quality run and attention maps on a checkpoint; one tar back
  ckpt=${1:-src/rainfusion/tools/demo/weights/demo.safetensors}
  PYTHONUNBUFFERED=1 timeout 330 python3 -m rainfusion.tools.cli demo --checkpoint "$ckpt" --out /tmp/demo/run "${@:2}" 2>&1 | grep -v Warning | tail -30
  timeout 90 python3 -m rainfusion.tools.demo.analysis --checkpoint "$ckpt" --out /tmp/demo/maps 2>&1 | grep -v Warning | tail -5
  tar -C /tmp/demo -cf "$out/demo.tar" .
fi
if [ "$what" = gluon ]; then  # the Gluon kernel: its tests first (a hang ends at the timeout), then timings
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider -m gpu -k gluon tests/kernels/test_block_sparse_kernels.py 2>&1 | tail -6 \
    && (cd benchmarks && timeout 300 python3 kernel_sweep.py --gluon 2>&1 | grep -v Warning | tail -20)
fi
if [ "$what" = treetests ]; then  # trees .trees/NAME/{src,tests} (benchmarks/NOTES.md): each tree's own GPU tests
  for name in "$@"; do  # of $TREE_TESTS (default: test_fp8.py, ~1 min a tree)
    echo "== $name"; (cd .trees/$name && PYTHONPATH=$PWD/src timeout ${TREE_TIMEOUT:-150} python3 -m pytest -q -x \
      -p no:cacheprovider -m gpu --rootdir . ${TREE_TESTS:-tests/kernels/test_fp8.py} 2>&1 | tail -2)
  done
fi
if [ "$what" = compare ]; then  # the same trees' same-call timings, the reference first (~1 min a tree)
  timeout 560 python3 benchmarks/compare_trees.py --out "$out/compare.json" \
    --trees $(tree_args "$@") 2>&1 | grep -v Warning | tail -20
fi
if [ "$what" = profile ]; then  # ncu of the same trees' kernel, side by side (benchmarks/profile_trees.py; ~1 min a tree)
  timeout 560 python3 benchmarks/profile_trees.py --out "$out/profiles" \
    --trees $(tree_args "$@") 2>&1 | grep -v Warning | tail -40
fi
if [ "$what" = hostprofile ]; then  # where the host's time of a call goes (benchmarks/host_profile.py; extra args: --preset ...)
  timeout 300 python3 benchmarks/host_profile.py "$@" 2>&1 | grep -v Warning | tee "$out/host-profile.txt" | tail -120
fi
if [ "$what" = breakdown ]; then  # the GPU's time of a call by kernel (benchmarks/gpu_breakdown.py; extra args: --preset ...)
  (cd benchmarks && timeout 300 python3 gpu_breakdown.py "$@" 2>&1 | grep -v -i warn | tee "$out/gpu-breakdown.txt" | tail -80)
fi
if [ "$what" = pytest ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 | tail -8
fi
if [ "$what" = quality ]; then  # benchmarks/demo_quality.py (issue 15's table; extra args: --only ...)
  PYTHONUNBUFFERED=1 timeout 560 python3 benchmarks/demo_quality.py --out "$out/demo-quality.json" \
    --plot "$out/demo-quality.png" "$@" 2>&1 | grep -v Warning | tail -40
fi
