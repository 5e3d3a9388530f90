#!/usr/bin/env bash
# Drift check: resolve the newest releases pyproject.toml allows into a throwaway lock, install it into a
# throwaway venv, and run the model tests there. Prints which packages moved and what broke; exits non-zero
# when a test fails. requirements.lock and .venv are not touched.
#   scripts/check_upgrades.sh                    the model tests (cache contract, LFM2 backend, engine, server)
#   scripts/check_upgrades.sh tests/test_x.py    other tests
#   KEEP=1 scripts/check_upgrades.sh             keep the throwaway venv (its path is printed)
#   WITH="transformers==5.23.0" scripts/check_upgrades.sh   then also install these (e.g. an older release we
#                                                 still claim to support) over the upgraded set
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
work=$(mktemp -d -t voicechat-upgrades.XXXXXX)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
echo "== resolving the newest releases pyproject.toml allows"
LOCK="$work/upgraded.lock" UV="$UV" scripts/lock.sh --upgrade >/dev/null
"$(scripts/find_python.sh)" - requirements.lock "$work/upgraded.lock" <<'PY'
import re, sys
pin = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)
old, new = (dict(pin.findall(open(p).read())) for p in sys.argv[1:3])
moved = sorted(n for n in old.keys() & new.keys() if old[n] != new[n])
print(f"{len(moved)} packages move:" if moved else "nothing moves: the lock is at the newest releases allowed")
for n in moved:
    print(f"  {n}: {old[n]} -> {new[n]}")
for n in sorted(new.keys() - old.keys()):
    print(f"  {n}: new, {new[n]}")
for n in sorted(old.keys() - new.keys()):
    print(f"  {n}: dropped ({old[n]})")
PY
echo "== installing them into $work/venv"
"$(scripts/find_python.sh)" -m venv "$work/venv"
VIRTUAL_ENV="$work/venv" "$UV" pip sync -q --require-hashes "$work/upgraded.lock"
VIRTUAL_ENV="$work/venv" "$UV" pip install -q --no-deps -e .
if [ -n "${WITH:-}" ]; then
  echo "== and $WITH"
  # shellcheck disable=SC2086
  VIRTUAL_ENV="$work/venv" "$UV" pip install -q $WITH
fi
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_cache_contract.py tests/test_lfm2_backend.py tests/test_lfm2_engine.py
                                  tests/test_lfm2_server.py tests/test_lfm2_turns.py tests/test_lfm2_mimi.py)
echo "== running ${tests[*]} on the upgraded packages"
status=0
env -u MODAL_TOKEN_ID -u MODAL_TOKEN_SECRET "$work/venv/bin/python" -m pytest -q -p no:cacheprovider -rfE \
  "${tests[@]}" || status=$?
if [ $status -eq 0 ]; then
  echo "== the upgraded packages pass; to adopt them: make lock ARGS=--upgrade && make test"
else
  echo "== the upgraded packages break the tests above (exit $status); requirements.lock is unchanged"
fi
exit $status
