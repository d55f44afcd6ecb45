#!/bin/sh
# The one install recipe of kdpipe's images: Dockerfile and Dockerfile.cuda run it, and tests/test_docker.py runs
# it in a virtualenv (with --no-deps, since a test machine has the dependencies already and may be offline).
#
#   sh docker/install.sh SRC EXTRAS [PIP_OPTION...]    install the kdpipe source tree SRC with EXTRAS
#                                                      (comma-separated: export,tracking), pinned by
#                                                      SRC/constraints.txt; PIP_OPTIONs go to pip as they are
#   sh docker/install.sh SRC --print-constraints       print the constraints that would be used, and stop
#
# Environment:
#   PYTHON                   the interpreter whose environment gets kdpipe (default: python3)
#   KDPIPE_BASE_CONSTRAINTS  the base image's own pip constraints file (NVIDIA's containers ship
#                            /etc/pip/constraint.txt): every package it pins keeps the base image's version, so
#                            kdpipe's pin for it is dropped (a missing file is ignored)
#   KDPIPE_UNPIN             names (space-separated) whose kdpipe pins are dropped too, to keep what the base has
#   KDPIPE_ONNXRUNTIME       onnxruntime (default) or onnxruntime-gpu: the GPU build, at the pinned onnxruntime
#                            version, replaces the CPU build afterwards (both install the same module)
set -eu

if [ "$#" -lt 2 ]; then
  echo "usage: $0 SRC EXTRAS [PIP_OPTION...] | $0 SRC --print-constraints" >&2
  exit 2
fi
src=$1
extras=$2
shift 2
python=${PYTHON:-python3}

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
base=${KDPIPE_BASE_CONSTRAINTS:-}
[ -n "$base" ] && [ -f "$base" ] || base=/dev/null
# Package names compared as pip does: case-insensitive, runs of "-", "_" and "." equal.
awk -v unpin="${KDPIPE_UNPIN:-}" '
  function norm(s) { s = tolower(s); gsub(/[-_.]+/, "-", s); return s }
  function name(line) {
    sub(/[ \t]*#.*/, "", line)
    if (!match(line, /^[A-Za-z0-9][A-Za-z0-9._-]*/)) return ""
    return norm(substr(line, RSTART, RLENGTH))
  }
  BEGIN { n = split(unpin, names, /[ \t]+/); for (i = 1; i <= n; i++) if (names[i] != "") drop[norm(names[i])] = 1 }
  FILENAME == ARGV[1] { key = name($0); if (key != "") drop[key] = 1; next }
  { key = name($0); if (key == "" || !(key in drop)) print }
' "$base" "$src/constraints.txt" >"$constraints"

if [ "$extras" = "--print-constraints" ]; then
  cat "$constraints"
  exit 0
fi

"$python" -m pip install --no-cache-dir --disable-pip-version-check -c "$constraints" "$@" "${src}[${extras}]"

if [ "${KDPIPE_ONNXRUNTIME:-onnxruntime}" = "onnxruntime-gpu" ]; then
  version=$(sed -n 's/^onnxruntime==\([^ ;#]*\).*/\1/p' "$src/constraints.txt")
  "$python" -m pip uninstall --yes onnxruntime
  "$python" -m pip install --no-cache-dir --disable-pip-version-check -c "$constraints" "$@" \
    "onnxruntime-gpu${version:+==$version}"
fi
