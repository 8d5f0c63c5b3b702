#!/usr/bin/env bash
# Prints one SHA-256 over the sources the extension is built from (setup.py and csrc/), in a
# fixed order; used to tell whether a carried, prebuilt module matches the tree
# (scripts/device_so.sh writes it, scripts/gpu_check.sh compares it).
set -euo pipefail
cd "$(dirname "$0")/.."
find setup.py csrc -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
