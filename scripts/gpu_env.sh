# Sourced by the GPU scripts: the carried megatron-core wheel (.whl/) and the environment every
# multi-GPU process on the GPU machine needs (NVLink multicast off).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_DEVICE_MAX_CONNECTIONS=1

record_device() {  # record_device FILE: the GPU, torch, megatron-core and commit a run used (then printed)
  { nvidia-smi -L; python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__)"
    echo "commit ${TSP_COMMIT:-unknown}"; } > "$1" 2>&1
  cat "$1"
}
