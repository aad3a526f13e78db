#!/bin/sh
# Installs the Debian interop tools listed in tools/debian-packages.txt when running as root with apt.
# Otherwise prints what is missing; tests needing a missing tool skip with the reason.
set -e
here=$(dirname "$0")
pkgs=$(grep -v '^#' "$here/debian-packages.txt" | grep -v '^$' | tr '\n' ' ')
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  missing=""
  for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
else
  echo "not root or no apt-get: skipping Debian tools ($pkgs); tests that need them will skip"
fi
