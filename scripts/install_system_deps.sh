#!/usr/bin/env bash
# Debian/Ubuntu libraries that Qt WebEngine (Chromium) and Mesa's software OpenGL need to run
# the Neuroglancer view, offscreen or on a desktop. Installs only what is missing, and only
# where it can (root with apt-get); otherwise prints the command for an administrator.
set -euo pipefail

packages=(
  libgl1 libegl1 libgl1-mesa-dri libegl-mesa0 libgbm1   # OpenGL/EGL with Mesa software rendering
  libnss3 libasound2 libdbus-1-3 libfontconfig1 libglib2.0-0
  libxkbcommon0 libxkbcommon-x11-0 libxkbfile1 libxcomposite1 libxdamage1 libxrandr2
  libxtst6 libxshmfence1 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1
)

if ! command -v dpkg >/dev/null 2>&1; then
  echo "install_system_deps: not a Debian-based system; install the equivalents of: ${packages[*]}" >&2
  exit 0
fi

missing=()
for pkg in "${packages[@]}"; do
  # libasound2 is a virtual package on newer Debian (libasound2t64); accept either.
  if ! dpkg -s "$pkg" >/dev/null 2>&1 && ! dpkg -s "${pkg}t64" >/dev/null 2>&1; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "install_system_deps: missing ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2
fi
