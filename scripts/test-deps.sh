#!/usr/bin/env bash
# Installs what the test suite drives besides Rust and the models (`make test` runs this):
# - haproxy (scale-out test behind a real load balancer), chromium and chromium-driver
#   (the browser playground's tests) from Debian;
# - a Python venv at target/test-venv with the packages pinned in scripts/test-requirements.txt
#   (kubernetes-validate, jsonschema, openai), reinstalled when that file changes.
# Idempotent: what is present is left alone.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# Debian packages: haproxy (scale-out test), chromium + chromium-driver (the playground,
# driven through WebDriver).
missing=()
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if (( ${#missing[@]} )); then
  echo "installing ${missing[*]} (apt-get)..." >&2
  if [[ $(id -u) -eq 0 ]]; then sudo=(); elif command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
    echo "error: ${missing[*]} missing and this user cannot install them: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv=$root/target/test-venv
wanted=$root/scripts/test-requirements.txt
if ! cmp -s "$wanted" "$venv/.installed-requirements"; then
  echo "preparing $venv with scripts/test-requirements.txt (pip)..." >&2
  [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$wanted"
  cp "$wanted" "$venv/.installed-requirements"
fi
