#!/usr/bin/env bash
# timm's own model test-suite (tests/test_models.py from the source distribution of the installed timm
# release) on every visattn model. Run after .ci/run has set up .venv.
#
# - the tests that download weights from the Hugging Face hub (test_model_load_pretrained,
#   test_model_features_pretrained) are deselected: CI has no network access to the hub;
# - Agent-DeiT (agent_deit*) is a class-token DeiT, so it joins timm's NON_STD_FILTERS, where timm puts its
#   own deit*/vit_* models (their forward_features are token sequences, not maps with a pool_size);
# - timm sizes the suite's timeouts (120 / 240 / 360 s) for its own CI runners and lets the TIMEOUT variable
#   replace them; here 2 cores run the largest visattn models (dinat_large*, van_b6 backward), so TIMEOUT
#   defaults to 360 s (none shorter than timm's). The FX tests keep timm's fixed 120 s: TIMEOUT does not
#   reach them. No test is skipped for time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$PWD/.venv/bin/python"
version=$("$PY" -c "import timm; print(timm.__version__)")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-binary :all: --no-deps "timm==$version" -d "$work"
tar -xzf "$work/timm-$version.tar.gz" -C "$work" "timm-$version/tests/test_models.py"
suite="$work/timm-$version/tests/test_models.py"
grep -q "^NON_STD_FILTERS = \[" "$suite"
sed -i "s/^NON_STD_FILTERS = \[/NON_STD_FILTERS = ['agent_deit*', /" "$suite"
models=$("$PY" -c "import visattn; print(' or '.join(visattn.list_models()))")
cd "$(dirname "$suite")"
TIMEOUT="${TIMEOUT:-360}" TORCH_BACKEND=visattn "$PY" -m pytest test_models.py -p no:cacheprovider -q -n 2 -W ignore \
    -k "($models) and not pretrained"
