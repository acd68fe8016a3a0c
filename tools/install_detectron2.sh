#!/usr/bin/env bash
# Installs detectron2 into the Python environment given as $1 (default: python3).
#
# 1. Upstream git at the pinned commit, where GitHub is reachable (builds the compiled ops).
# 2. Otherwise the package index's `sal-detectron2==0.7.2` wheel: the same commit's Python
#    code repackaged, tagged for CPython 3.10 only. It is fetched for 3.10, its sha256 checked,
#    and unpacked into the environment as pure Python (its 3.10-only _C extension is dropped:
#    Faster R-CNN and RetinaNet do not need it; pycocotools replaces the fast COCO evaluator).
set -euo pipefail

PY=${1:-python3}
COMMIT=a59f05630a8f205756064244bf5beb8661f96180
WHEEL_SPEC=sal-detectron2==0.7.2
WHEEL_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561

die() {
  echo "install_detectron2: $*" >&2
  exit 1
}

if "$PY" -c "import detectron2, detectron2.modeling" 2>/dev/null; then
  echo "install_detectron2: detectron2 already importable in $PY"
  exit 0
fi

if [ "${D2KD_SKIP_GIT:-0}" != 1 ] && timeout 10 git ls-remote https://github.com/facebookresearch/detectron2 HEAD >/dev/null 2>&1; then
  echo "install_detectron2: GitHub reachable, building detectron2@$COMMIT from source"
  "$PY" -m pip install --no-build-isolation "git+https://github.com/facebookresearch/detectron2.git@$COMMIT" \
    || die "building detectron2 from git failed; see the pip output above (a compiler and the torch headers are needed)"
  exit 0
fi

echo "install_detectron2: GitHub unreachable, using the index wheel $WHEEL_SPEC (pure Python)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.10 \
  --implementation cp -d "$tmp" "$WHEEL_SPEC" \
  || die "could not download $WHEEL_SPEC from the package index; check pip's index settings, or install detectron2 by hand"
whl=$(ls "$tmp"/*.whl 2>/dev/null | head -n 1)
[ -n "$whl" ] || die "pip reported success but left no wheel in $tmp"
got=$(sha256sum "$whl" | cut -d' ' -f1)
[ "$got" = "$WHEEL_SHA256" ] || die "sha256 of $(basename "$whl") is $got, expected $WHEEL_SHA256; refusing to install it"

site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" - "$whl" "$site" <<'PYEOF'
import sys, zipfile
whl, site = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as zf:
    # only the library and its metadata; the compiled op is for CPython 3.10 and the wheel's
    # top-level tools/ would land as a package named "tools" in site-packages.
    members = [m for m in zf.namelist()
               if (m.startswith("detectron2/") or ".dist-info/" in m) and not m.endswith(".so")]
    zf.extractall(site, members)
print(f"install_detectron2: unpacked {len(members)} files into {site}")
PYEOF
"$PY" -c "import detectron2.modeling, detectron2.engine" \
  || die "detectron2 was unpacked but does not import; check that the requirements in requirements.txt are installed"
echo "install_detectron2: ok"
