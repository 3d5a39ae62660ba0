#!/usr/bin/env bash
# The MLLM tests against the oldest transformers of the declared range (tests/constraints-transformers-oldest.txt).
# The environment is the main .venv with only transformers (and its hub/tokenizers pins) replaced: a second
# venv whose site-packages shadow those three packages and otherwise defer to .venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-oldest
python3 -m venv .venv-oldest
main_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
old_site=$(.venv-oldest/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$main_site')" > "$old_site/zz_visattn_main_env.pth"
.venv-oldest/bin/pip install -q -c tests/constraints-transformers-oldest.txt transformers huggingface_hub tokenizers
.venv-oldest/bin/python -c "import transformers; print('transformers', transformers.__version__, 'at', transformers.__file__)"
.venv-oldest/bin/python -m pytest -n 2 -q -p no:cacheprovider tests/test_mllm_*.py
