#!/usr/bin/env bash
# The embedded default job (`make demo`): build a small sample store, pack it into LMDB, Arrow and HDF5,
# then inspect and validate the results. Re-running starts from a clean output folder.
set -euo pipefail
venv="${1:-.venv}"
out="${2:-demo-out}"
py="$venv/bin/python"
cli="$venv/bin/vilbert-cli"
rm -rf "$out"
mkdir -p "$out"
set -x
"$py" -m vilbert.datasets.sample --out "$out/sample" --num-images 200 --seed 0
"$cli" pack --format lmdb --from "$out/sample" --out "$out/store-lmdb"
"$cli" pack --format arrow --from "$out/store-lmdb" --out "$out/store-arrow"
"$cli" pack --format hdf5 --from "$out/store-arrow" --out "$out/store-hdf5"
"$cli" inspect "$out/store-lmdb"
"$cli" validate "$out/store-lmdb"
"$cli" validate "$out/store-arrow"
"$cli" validate "$out/store-hdf5"
{ set +x; } 2>/dev/null
echo "demo finished: stores under $out/"
