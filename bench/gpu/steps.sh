# Sourced by the bench/gpu scripts that pack their JSON results, from the repository root:
# sets OUT and RES, installs the carried wheels (machine_env.sh), defines step and quiet.
OUT=${OUT:-/tmp/tandem-gpu}
RES=/tmp/tandem-gpu-results  # the JSON files, packed into $OUT/results.tgz after each step
mkdir -p "$OUT" "$RES"
source bench/gpu/machine_env.sh
# (the device tool returns at most 8 files, so the JSONs travel as one archive)
step() { tar czf "$OUT/results.tgz" -C "$RES" .; echo; echo "=== $* ($(date +%T), ${SECONDS}s)"; }
quiet() { grep -v 'NIXL INFO'; }
