#!/usr/bin/env bash
# The lmms-eval plugin tests (tests/test_lmms_eval_plugin.py: lmms-eval's own command line on tiny
# checkpoints of every supported family) in an environment with visattn[eval]. lmms-eval brings ~90
# packages (about 1 GB) and needs filelock < 4, so they go to a second venv whose site-packages come
# first and otherwise defer to .venv's (as .ci/oldest_deps.sh does): .venv and the README's test command
# stay without lmms-eval, where these tests skip. pytest runs serially: the plugin tests' module fixture
# runs its lmms-eval subprocesses two at a time itself.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-lmms
python3 -m venv .venv-lmms
main_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
eval_site=$(.venv-lmms/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$main_site')" > "$eval_site/zz_visattn_main_env.pth"
.venv-lmms/bin/pip install -q -e ".[eval]"
.venv-lmms/bin/python - <<'PY'
import lmms_eval.models, torch, transformers
from importlib.metadata import version
print("lmms-eval", version("lmms-eval"), "torch", torch.__version__, "transformers", transformers.__version__)
assert "visattn" in lmms_eval.models.list_available_models(), "the visattn entry point did not register"
PY
.venv-lmms/bin/python -m pytest -q -p no:cacheprovider tests/test_lmms_eval_plugin.py tests/test_reducer_args.py
