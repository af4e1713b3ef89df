# Sourced by the tools/gpu/*.sh checks: install the wheels the GPU image lacks (carried in .whl/:
# transformers, deepspeed and what they need) into /tmp/site, and put the repository on the path.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
