#!/usr/bin/env bash
# The GPU check: install the wheels it is given, then run bench/gpu_check.py (docs/PERFORMANCE.md, "How to run
# the GPU check").
#
#     bash bench/gpu_check.sh --stage .whl/unsloth    # device call 1: install only (the machine stays warm 30 s)
#     bash bench/gpu_check.sh .whl/core               # device call 2: install, then every step (< 5 min, H100)
#     make gpu-check ARGS=--tiny                      # here: a rehearsal at a tiny size, nothing installed
#
# Arguments that are folders are wheel folders: their *.whl go into /tmp/site with pip --target (no network,
# no dependency resolution), which the next call on the same warm machine still has; a folder's
# spin_lite_home/ (the embedded model's tokenizer files) goes to /tmp/spin_lite_home. --stage stops after
# installing. Every other argument goes to bench/gpu_check.py (--tiny, --only STEP..., --budget S).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
stage=0
args=()
for a in "$@"; do
    if [ "$a" = "--stage" ]; then
        stage=1
    elif [ -d "$a" ]; then
        if ls "$a"/*.whl >/dev/null 2>&1; then
            echo "gpu-check: installing $(ls "$a"/*.whl | wc -l) wheels from $a into /tmp/site"
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                "$a"/*.whl || { echo "gpu-check: installing the wheels of $a failed" >&2; exit 2; }
        fi
        if [ -d "$a/spin_lite_home" ]; then
            mkdir -p /tmp/spin_lite_home && cp -r "$a/spin_lite_home/." /tmp/spin_lite_home/
        fi
    else
        args+=("$a")
    fi
done
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/spin_lite_home ] && export SPIN_LITE_HOME=/tmp/spin_lite_home
if [ "$stage" = 1 ]; then
    echo "gpu-check: staged; /tmp/site holds $(ls /tmp/site 2>/dev/null | grep -c dist-info) packages"
    exit 0
fi
[ -d /tmp/site ] || echo "gpu-check: no wheel folder given: using the packages this Python has"
exec "$PY" bench/gpu_check.py "${args[@]}"
