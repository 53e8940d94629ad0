#!/usr/bin/env bash
# The GPU check: install the wheels it is given, then run bench/gpu_check.py (docs/PERFORMANCE.md, "How to run
# the GPU check").
#
#     bash bench/gpu_check.sh .whl                    # on the GPU machine: ONE device call, carry [".whl"]
#     make gpu-check ARGS=--tiny                      # here: a rehearsal at a tiny size, nothing installed
#
# Each argument that is a folder of wheels holds wheel folders (or is one): the *.whl of a folder named unsloth go into
# /tmp/site-unsloth, which gpu_check.py puts on the path of its unsloth step alone (model.backend=auto picks
# unsloth wherever it imports, so every other step would silently measure unsloth); all other *.whl go into
# /tmp/site, on every step's path. pip --target, no network, no dependency resolution. A spin_lite_home/
# beside them (the embedded model's tokenizer files) goes to /tmp/spin_lite_home. Everything is installed
# again on every call, so a machine that went cold between calls changes nothing. Every other argument goes to
# bench/gpu_check.py (--tiny, --only STEP..., --budget S).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
args=()
install() {  # wheel folder, target
    echo "gpu-check: installing $(ls "$1"/*.whl | wc -l) wheels from $1 into $2"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl \
        || { echo "gpu-check: installing the wheels of $1 failed" >&2; exit 2; }
}
for a in "$@"; do
    # a folder with wheels in it or one level down (not `tests`, a step's name that is also a folder here)
    if [ -d "$a" ] && [ -n "$(find "$a" -maxdepth 2 -name '*.whl' -print -quit)" ]; then
        for d in "$a" "$a"/*/; do
            d=${d%/}
            if ls "$d"/*.whl >/dev/null 2>&1; then
                if [ "$(basename "$d")" = unsloth ]; then install "$d" /tmp/site-unsloth; else install "$d" /tmp/site; fi
            fi
            if [ -d "$d/spin_lite_home" ]; then
                mkdir -p /tmp/spin_lite_home && cp -r "$d/spin_lite_home/." /tmp/spin_lite_home/
            fi
        done
    else
        args+=("$a")
    fi
done
# the repository itself (spin_lite is not installed there), then the staged wheels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
[ -d /tmp/site-unsloth ] && export SPIN_LITE_UNSLOTH_SITE=/tmp/site-unsloth
[ -d /tmp/spin_lite_home ] && export SPIN_LITE_HOME=/tmp/spin_lite_home
# no network there: no hub retries, no Unsloth statistics ping
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export PYTHONUNBUFFERED=1
[ -d /tmp/site ] || echo "gpu-check: no wheel folder given: using the packages this Python has"
exec "$PY" bench/gpu_check.py "${args[@]}"
