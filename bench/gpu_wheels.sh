#!/usr/bin/env bash
# Wheels the GPU machine lacks, for `make gpu-check` there (it has no network; one call carries <= 64 MiB).
#
#     make gpu-wheels          # = bash bench/gpu_wheels.sh; here, with network
#
# Writes two folders, each carried by one device call (docs/PERFORMANCE.md, "How to run the GPU check"):
#   .whl/core/      bitsandbytes (43 MB), trl, datasets and what they need there, and the embedded model's
#                   tokenizer files (spin_lite_home/: the GPU tests use its vocabulary and chat template)
#   .whl/unsloth/   unsloth, unsloth_zoo and what they need there (no xformers: unsloth runs without it)
# Python 3.12, manylinux x86_64, no dependencies resolved (--no-deps): the machine already has torch 2.11,
# transformers 5.17, peft, accelerate, pyarrow, pandas, ... (../shared/GPU.md). One version of each package.
# trl is 1.15.0 for both: unsloth pins trl <= 1.15.0, and two versions would stop the whole install.
# Keep .whl out of git: echo /.whl/ >> .git/info/exclude
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"

CORE="bitsandbytes==0.50.2 trl==1.15.0 datasets==4.8.0 dill==0.4.0 multiprocess==0.70.18"
UNSLOTH="unsloth==2026.10.9 unsloth_zoo==2026.10.9 torchao==0.18.0 tyro==1.0.17 docstring_parser==0.18.0
 shtab==1.13.0 typeguard==4.6.1 cut_cross_entropy==25.1.1 msgspec==0.22.0 hf_transfer==0.1.9 diffusers==0.42.1
 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0
 json5==0.17.3 nest_asyncio==1.6.0 structlog==26.1.0"

fetch() {  # folder, packages...
    local dir=$1; shift
    mkdir -p "$dir"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $PLATFORMS -d "$dir" "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
    for p in "$@"; do  # fail loudly if a pinned wheel did not come
        name=$(echo "${p%%==*}" | tr '-' '_' | tr 'A-Z' 'a-z')
        ls "$dir" | tr '-' '_' | tr 'A-Z' 'a-z' | grep -q "^${name}_" || { echo "missing wheel: $p" >&2; exit 1; }
    done
}

fetch .whl/core $CORE
# the tokenizer of the embedded model, without its weights: embedded_model_dir() finds config.json and stops there
home=.whl/core/spin_lite_home/SmolLM2-135M-Instruct
mkdir -p "$home"
src=$("$PYTHON" -c "from spin_lite.model import embedded_model_dir; print(embedded_model_dir())")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja \
         special_tokens_map.json; do
    [ -e "$src/$f" ] && cp "$src/$f" "$home/"
done
fetch .whl/unsloth $UNSLOTH

for d in .whl/core .whl/unsloth; do
    size=$(du -sb "$d" | cut -f1)
    printf '%-14s %5.1f MiB  %s\n' "$d" "$(echo "$size / 1048576" | bc -l)" "$(ls "$d" | grep -c '\.whl$') wheels"
    [ "$size" -le $((60 * 1048576)) ] || { echo "$d is over 60 MiB: a device call carries 64 MiB with the repo" >&2; exit 1; }
done
