#!/usr/bin/env bash
# The tests that use transformers, diffusers and open_clip against the oldest releases of their declared
# ranges (tests/constraints-oldest.txt). The environment is the main .venv with only those packages (and
# transformers' hub / tokenizers pins) replaced: a second venv whose site-packages shadow them and
# otherwise defer to .venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-oldest
python3 -m venv .venv-oldest
main_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
old_site=$(.venv-oldest/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$main_site')" > "$old_site/zz_visattn_main_env.pth"
packages=(transformers huggingface_hub tokenizers kernels diffusers open_clip_torch)
.venv-oldest/bin/pip install -q -c tests/constraints-oldest.txt "${packages[@]}"
.venv-oldest/bin/python - <<'PY'
import diffusers, kernels, open_clip, transformers
for module in (transformers, kernels, diffusers, open_clip):
    print(module.__name__, module.__version__, "at", module.__file__)
PY
.venv-oldest/bin/python -m pytest -n 2 -q -p no:cacheprovider tests/test_mllm_*.py tests/test_diffusers_agent.py \
    tests/test_open_clip_towers.py
