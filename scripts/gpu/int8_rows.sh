# `bash scripts/gpu/int8_rows.sh` on the GPU machine, carry [".whl"]. Under a 4 GiB cap at 1024²:
# the int8 row eager (`--no-compile`), the bf16 row (the same-run reference), the int8 row compiled
# (with recompiles, graph breaks and Inductor's log), so a row whose compile runs for minutes still
# says what its images cost; then the GGUF GPU tests. A step still running after 90 s has its
# processes' Python stacks written each minute (py-spy, from .whl), to show where the time goes.
# Each step gets what is left of B seconds (default 560); files in $OUT have no ':' (run drops such names).
set -o pipefail
. scripts/gpu/setup.sh || exit 1
. scripts/gpu/steps.sh
row=(python3 -m zturbo.cli bench --random-weights --sizes 1024 --runs 3 --cap-row)
step int8-eager 200 "${row[@]}" zturbo-int8:4 --no-compile
step bf16-compiled 150 "${row[@]}" zturbo:4  # the same-run reference: the bf16-exact plan under the cap
TORCH_LOGS=recompiles,graph_breaks,inductor step int8-compiled 240 "${row[@]}" zturbo-int8:4
step gguf-tests 200 python3 -m pytest -q -m gpu tests/test_gguf.py -p no:cacheprovider
el done; pack
