# Sourced by the bench/gpu scripts, from the repository root on a lent GPU machine: installs
# the wheels that travel in .whl/ (the image lacks nixl and OpenTelemetry; see
# bench/gpu/README.md) and points Python at them and at this checkout.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export TANDEM_HOME=/tmp/tandem-home PYTHONUNBUFFERED=1
