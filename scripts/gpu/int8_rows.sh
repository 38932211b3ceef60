# `bash scripts/gpu/int8_rows.sh` on the GPU machine, carry [".whl"]. Under a 4 GiB cap at 1024²:
# the int8 row compiled, the bf16 row compiled (the same-run reference), then the GGUF GPU tests.
# int8_probe.sh adds eager int8 and the profiles. Each step gets what is left of B seconds
# (default 560); $OUT/out.tgz holds every file.
set -o pipefail
. scripts/gpu/setup.sh || exit 1
. scripts/gpu/steps.sh
row=(python3 -m zturbo.cli bench --random-weights --sizes 1024 --runs 3 --cap-row)
step int8 200 "${row[@]}" zturbo-int8:4
step bf16-compiled 150 "${row[@]}" zturbo:4  # the same-run reference: the bf16-exact plan under the cap
step gguf-tests 200 python3 -m pytest -q -m gpu tests/test_gguf.py -p no:cacheprovider
el done; pack
