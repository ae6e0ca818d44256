#!/usr/bin/env bash
# The GPU check as one command on a machine that may lack make and this repository's .venv
# (a GPU image with torch): `bash bench/gpu_check.sh [gpu_check.py options]`. `make gpu-check`
# runs it too. Without .venv it uses python3 (or $GPU_PYTHON) and first installs the wheels
# carried in .whl/ (`make gpu-wheels` fills it) into $GPU_SITE, ahead on the module path.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv/bin/python
py=${GPU_PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x "$venv" ]]; then py=$venv; else py=python3; fi
fi
if [[ "$py" != "$venv" ]] && compgen -G ".whl/*.whl" >/dev/null; then
  site=${GPU_SITE:-/tmp/lmforge-site}
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
fi
exec "$py" bench/gpu_check.py "$@"
