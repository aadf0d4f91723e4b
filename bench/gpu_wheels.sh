# Sourced by the GPU plans (gpu_throughput.sh, gpu_perf.sh): installs the packages the GPU image lacks from the
# wheels carried in .wheels/ (only what is not importable there) into $SITE, and puts $SITE and the checkout on
# PYTHONPATH. SKIP_INSTALL=1 skips the install (a CPU smoke run in the project's venv).
if [[ -z "${SKIP_INSTALL:-}" ]]; then
  need=()
  for m in trl datasets dill multiprocess xxhash tenacity; do python3 -c "import $m" 2>/dev/null || need+=("$m"); done
  python3 -c "import pandas" 2>/dev/null || need+=(pandas python_dateutil six)
  python3 -c "import matplotlib" 2>/dev/null || need+=(matplotlib contourpy cycler fonttools kiwisolver pyparsing \
    python_dateutil six)
  python3 -c "import requests" 2>/dev/null || need+=(requests urllib3 charset_normalizer idna certifi)
  files=()
  for name in $(printf '%s\n' "${need[@]}" | sort -u); do files+=(.wheels/"$name"-[0-9]*.whl); done
  if (( ${#files[@]} )); then python3 -m pip install -q --no-index --no-deps --target "$SITE" "${files[@]}"; fi
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
