#!/usr/bin/env bash
# Prepares the wheel folder scripts/gpu_check.sh installs from on a bare GPU image (no network there).
#
#   scripts/gpu_wheels.sh [DIR]        (default .wheels, ignored by git; run on a machine with the registry)
#
# Downloads, without dependencies, the exact versions requirements.lock pins of what `bench run` and
# `bench perf` need beyond the image's torch, torchvision, timm, peft, pandas, scipy, pyyaml, tqdm and
# scikit-learn (the list: scripts/gpu_check_steps.py, NEEDED): webdataset, wids, braceexpand, pyautoattack
# (it carries the embedded backbone's weights, most of the folder), DeepSpeed and its dependencies. Binary
# wheels (msgpack, pydantic-core) are fetched for CPython 3.10-3.13, since the image's python version is not
# known here. DeepSpeed is published as a source distribution only; building it on the image would need
# torch in an isolated build environment (no network there), so its wheel is built here
# (`pip wheel --no-deps --no-build-isolation`, ops left to DeepSpeed's JIT: a py3-none-any wheel).
# Left out by design: Ray (larger than the 64 MiB a device call carries), W&B (tracking off there).
# Prints the folder's size and fails when it is over 60 MiB (the repo's own files travel in the same 64 MiB).
set -euo pipefail

DIR="${1:-.wheels}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
LIMIT_MIB=60
export PIP_DISABLE_PIP_VERSION_CHECK=1

# pip, less the "Location ... is ignored" lines a machine's pip config (index folders lacking some packages)
# prints once per package and folder, as the Makefile's set-up drops them; pipefail keeps pip's failures
pip_() { "$PY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

mkdir -p "$DIR"
LIST="$("$PY" "$REPO/scripts/gpu_check_steps.py" wheels "$REPO/requirements.lock")"
ANY=() BINARY=() SDIST=()
while read -r spec kind; do
  case "$spec" in deepspeed==*) SDIST+=("$spec") ;; *) [ "$kind" = binary ] && BINARY+=("$spec") || ANY+=("$spec") ;; esac
done <<< "$LIST"

pip_ download -q --no-deps -d "$DIR" "${ANY[@]}"
for v in 3.10 3.11 3.12 3.13; do
  pip_ download -q --no-deps --only-binary=:all: --python-version "$v" --implementation cp \
    --platform manylinux2014_x86_64 -d "$DIR" "${BINARY[@]}"
done

# DeepSpeed: its sdist, built into a wheel here (setup.py imports torch: no build isolation)
for spec in "${SDIST[@]}"; do
  name="${spec%%==*}" version="${spec##*==}"
  if ! ls "$DIR/$name-$version"-*.whl > /dev/null 2>&1; then
    tmp="$(mktemp -d)"
    pip_ download -q --no-deps -d "$tmp" "$spec"  # an sdist: DeepSpeed publishes no wheel
    DS_BUILD_OPS=0 pip_ wheel -q --no-deps --no-build-isolation -w "$DIR" "$tmp"/*
    rm -rf "$tmp"
  fi
done
rm -f "$DIR"/*.tar.gz  # only wheels travel

size_kib=$(du -sk "$DIR" | cut -f1)
echo "$DIR: $(ls "$DIR" | wc -l) files, $((size_kib / 1024)) MiB ($size_kib KiB); limit $LIMIT_MIB MiB"
ls -1 "$DIR"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "gpu_wheels.sh: error: $DIR is over $LIMIT_MIB MiB: it would not travel with a device call" >&2
  exit 1
fi
