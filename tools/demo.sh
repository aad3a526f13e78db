#!/bin/sh
# make demo: inspect the golden disk, then the whole offline pipeline on it (templatetool demo).
set -eu
cd "$(dirname "$0")/.."
T=.venv/bin/templatetool
OUT=demo-out
rm -rf "$OUT"
printf '== inspect the golden template disk\n'
$T inspect fixtures/golden.vhdx
printf '\n== structural check + cross-check against libvhdi\n'
$T vhdx check fixtures/golden.vhdx --cross-check
start=$(date +%s)
$T demo -o "$OUT"
printf '\n== the shielded VM disk\n'
$T inspect "$OUT/vm.vhdx"
printf '\ndemo finished in %s s: artifacts in %s/\n' "$(( $(date +%s) - start ))" "$OUT"
