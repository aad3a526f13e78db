#!/bin/sh
# make demo: the main pipeline on the golden disk in fixtures/. Grows as capabilities land.
set -eu
cd "$(dirname "$0")/.."
T=.venv/bin/templatetool
OUT=demo-out
rm -rf "$OUT"; mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }
has() { $T --help | grep -q "^  $1 "; }

step "inspect the golden template disk"
$T inspect fixtures/golden.vhdx

if has vhdx; then
  step "structural check + cross-check against libvhdi"
  $T vhdx check fixtures/golden.vhdx --cross-check
  step "convert to a fixed VHDX and back to raw"
  $T -q vhdx convert fixtures/golden.vhdx "$OUT/golden-fixed.vhdx" --subformat fixed
  $T -q vhdx convert "$OUT/golden-fixed.vhdx" "$OUT/golden.raw"
  if command -v qemu-img >/dev/null; then
    qemu-img convert -f vhdx -O raw fixtures/golden.vhdx "$OUT/golden-qemu.raw"
    cmp "$OUT/golden.raw" "$OUT/golden-qemu.raw" && echo "round trip byte-identical to qemu-img's reading"
  fi
fi

if has encrypt; then
  step "encrypt the OS volume (BitLocker XTS-AES-128, recovery password + startup key)"
  $T -q encrypt fixtures/golden.vhdx -o "$OUT/encrypted.vhdx" \
     --recovery-password-out "$OUT/recovery.txt" --startup-key-out "$OUT/startup.bek"
  $T inspect "$OUT/encrypted.vhdx"
  step "decrypt it again with the recovery password"
  $T -q decrypt "$OUT/encrypted.vhdx" -o "$OUT/decrypted.vhdx" --recovery-password-file "$OUT/recovery.txt"
fi

if [ -x tools/demo-more.sh ]; then
  tools/demo-more.sh "$T" "$OUT"
fi
printf '\ndemo finished: outputs in %s/\n' "$OUT"
