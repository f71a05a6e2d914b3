# Sourced at the start of a device run (nvidia-h200): installs the carried wheels (.whl/) into
# /tmp/site and puts it and the checkout on PYTHONPATH. Keeps NVLink multicast off.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/zmq ] || [ ! -d /tmp/site/nixl_cu13 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/pyzmq-*.whl .whl/nixl-1.5.1-py3-none-any.whl || return 1
  python3 -c "import zipfile; zipfile.ZipFile('.whl/nixl-stripped.zip').extractall('/tmp/site')" || return 1
fi
export PYTHONPATH=/tmp/site:$PWD
