#!/usr/bin/env bash
# Create (or bring up to date) the project's virtualenv with the pinned stack; idempotent.
# Usage: tools/setup_env.sh [VENV_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv}"
stamp="$venv/.vilbert-setup"
want="$( (python3 --version; cat "$here/tools/constraints.txt" "$here/pyproject.toml" \
          "$here/tools/install_detectron2.py" "$0") | sha256sum | cut -c1-16)"
# Up to date only if the inputs are unchanged AND the environment still imports (a removed or upgraded
# interpreter leaves a stamp behind but a broken venv).
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$venv/bin/python" -c "import vilbert, torch, torchvision, detectron2" 2>/dev/null; then
  echo "environment $venv is up to date"
  exit 0
fi
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# torch first and pinned, so nothing later pulls another build.
"${pip[@]}" install -c "$here/tools/constraints.txt" torch torchvision
"${pip[@]}" install -c "$here/tools/constraints.txt" -e "$here[model,extract,train,legacy,dev]"
"$venv/bin/python" "$here/tools/install_detectron2.py"
echo "$want" > "$stamp"
echo "environment ready: $venv"
