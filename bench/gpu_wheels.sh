# Sourced by the GPU plans (gpu_throughput.sh, gpu_perf.sh): installs the packages the GPU image lacks from the
# wheels carried in .wheels/ (only what is not importable there) into $SITE, and puts $SITE and the checkout on
# PYTHONPATH. SKIP_INSTALL=1 skips the install (a CPU smoke run in the project's venv).
#
# PIN_TRANSFORMERS=1: run with the transformers version constraints.txt pins (the image ships an older one)
# instead of the image's. .wheels/pin/ holds that version's closure at the project's constraints (`pip download
# --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
# --platform any -c constraints.txt transformers==<pin> -d .wheels/pin`); each wheel whose package the image
# lacks or has in an older version goes into $SITE, ahead of the image's packages. A pin that does not import
# afterwards stops the plan with the reason.
PY=${PY:-python3}
pin=""
if [[ -n "${PIN_TRANSFORMERS:-}" && -z "${SKIP_INSTALL:-}" ]]; then
  pin=$(grep -m1 '^transformers==' constraints.txt | cut -d= -f3)
  mapfile -t newer < <("$PY" - <<'PYEOF'
import glob
import importlib.metadata as md
import os

from packaging.version import Version

for whl in sorted(glob.glob(".wheels/pin/*.whl")):
    name, version = os.path.basename(whl).split("-")[:2]
    try:
        have = Version(md.version(name))
    except md.PackageNotFoundError:
        have = None
    if have is None or have < Version(version):
        print(whl)
PYEOF
  )
  if (( ${#newer[@]} )); then "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${newer[@]}"; fi
fi
if [[ -z "${SKIP_INSTALL:-}" ]]; then
  need=()
  for m in trl datasets dill multiprocess xxhash tenacity; do "$PY" -c "import $m" 2>/dev/null || need+=("$m"); done
  "$PY" -c "import pandas" 2>/dev/null || need+=(pandas python_dateutil six)
  "$PY" -c "import matplotlib" 2>/dev/null || need+=(matplotlib contourpy cycler fonttools kiwisolver pyparsing \
    python_dateutil six)
  "$PY" -c "import requests" 2>/dev/null || need+=(requests urllib3 charset_normalizer idna certifi)
  files=()
  for name in $(printf '%s\n' "${need[@]}" | sort -u); do files+=(.wheels/"$name"-[0-9]*.whl); done
  if (( ${#files[@]} )); then "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${files[@]}"; fi
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -n "$pin" ]]; then
  got=$("$PY" -c "import transformers; print(transformers.__version__)" 2>&1 | tail -n1)
  [[ "$got" == "$pin" ]] || { echo "PIN_TRANSFORMERS: transformers $pin did not import from .wheels/pin: $got" >&2; exit 1; }
  echo "transformers $pin (pinned, from .wheels/pin)"
fi
