#!/usr/bin/env bash
# Print the path of a Python 3.12 interpreter, or explain how to get one.
# liquid-audio needs exactly 3.12 (it uses 3.12-only syntax).
set -u
is312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }
candidates=("${PYTHON:-}" python3.12)
if command -v pyenv >/dev/null 2>&1; then
  candidates+=("$(pyenv root)"/versions/3.12*/bin/python3.12)
fi
candidates+=(/usr/local/bin/python3.12 /usr/bin/python3.12 "$HOME"/.local/bin/python3.12 python3)
for c in "${candidates[@]}"; do
  [ -n "$c" ] || continue
  if is312 "$c"; then command -v "$c" 2>/dev/null || echo "$c"; exit 0; fi
done
cat >&2 <<'MSG'
error: no Python 3.12 interpreter found (liquid-audio requires 3.12).
Install one, then re-run make:
  - pyenv:  pyenv install 3.12
  - Debian: apt-get install python3.12 python3.12-venv
  - uv:     uv python install 3.12
or point to it explicitly:  make PYTHON=/path/to/python3.12 ...
MSG
exit 1
