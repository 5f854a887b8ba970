#!/usr/bin/env bash
# Is the oldest transformers that pyproject.toml allows still right? Not run by .ci/run (about
# 2-3 minutes; needs PyPI). Builds a fresh virtual environment with torch 2.13.0, the project's
# requirements and transformers pinned to the declared floor, then
#   1. checks that pip resolves it (tokenizers, huggingface-hub, numpy next to torch 2.13),
#   2. compares the segmenter's outputs (GradCAM maps, ITM scores, patch features, CLIP
#      embeddings) on a tiny BLIP and CLIP with those computed by the transformers of the
#      environment you run this from (the reference; python3 with the project's requirements),
#   3. runs the tests that exercise transformers' BLIP and CLIP, tiny and bundled models.
# Usage: bash .ci/check_transformers_floor.sh [VENV_DIR]     (default: $TMPDIR/venv-transformers-floor)
#        TRANSFORMERS=4.55.4 bash .ci/check_transformers_floor.sh   # try another version
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${1:-${TMPDIR:-/tmp}/venv-transformers-floor}
floor=$(grep -oE '"transformers>=[0-9][0-9.]*' pyproject.toml | cut -d= -f2)
version=${TRANSFORMERS:-$floor}
[ -n "$version" ] || { echo "no transformers>=X.Y in pyproject.toml: give TRANSFORMERS=X.Y.Z" >&2; exit 2; }
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1

echo "== transformers $version (declared floor: ${floor:-none}) in $venv"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0                   # the local CPU build, before anything asks for torch
if [ -z "${TRANSFORMERS:-}" ]; then   # the declared floor, resolved together with every other requirement
    "$venv/bin/pip" install -q -e . "transformers==$version" pytest
else                                   # any version, below the declared floor too: that is the point
    "$venv/bin/pip" install -q -e . pytest
    "$venv/bin/pip" install -q "transformers==$version"
fi
broken=$("$venv/bin/pip" check 2>&1 | grep -v -e "^No broken" -e "^ovss-tune .* transformers" || true)
if [ -n "$broken" ]; then
    echo "$broken"
    echo "transformers $version does not install cleanly next to torch 2.13.0 and the other requirements"
    exit 1
fi
"$venv/bin/python" -c "
import huggingface_hub, numpy, tokenizers, torch, transformers
print('resolved: transformers', transformers.__version__, '| tokenizers', tokenizers.__version__,
      '| huggingface-hub', huggingface_hub.__version__, '| numpy', numpy.__version__, '| torch', torch.__version__)"

echo "== outputs against the reference environment's transformers"
reference=$(mktemp -d)
trap 'rm -rf "$reference"' EXIT
PYTHONPATH=$root python3 tools/check_transformers_floor.py save "$reference"
status=0
PYTHONPATH=$root "$venv/bin/python" tools/check_transformers_floor.py compare "$reference" || status=1

echo "== tests"
PYTHONPATH=$root "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_segmenter.py tests/test_official.py tests/test_candidates.py tests/test_candidate_file.py \
    tests/test_objectives.py tests/test_shapes_world.py tests/test_reproduce_paper.py \
    tests/test_bridgetower.py || status=1
[ $status = 0 ] && echo "transformers $version: outputs match and the tests pass" \
    || echo "transformers $version: FAILED (see above)"
exit $status
