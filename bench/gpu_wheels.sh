#!/usr/bin/env bash
# Wheels the GPU machine lacks, for `make gpu-check` there (it has no network; one call carries <= 64 MiB).
#
#     make gpu-wheels          # = bash bench/gpu_wheels.sh; here, with network
#
# Writes .whl/ (docs/PERFORMANCE.md, "How to run the GPU check"), carried whole by ONE device call:
#   .whl/core/      bitsandbytes, trl, datasets and what they need there, pytest and its two dependencies,
#                   liger-kernel (train.fused_kernels: liger; Triton comes with torch there),
#                   and the embedded model's tokenizer files (spin_lite_home/: the GPU tests use its vocabulary
#                   and chat template). Installed into /tmp/site, on every step's path.
#   .whl/unsloth/   unsloth, unsloth_zoo and what they need there (no xformers: unsloth runs without it).
#                   Installed into /tmp/site-unsloth, on the path of the unsloth step only, so that every other
#                   step measures the hf backend (model.backend=auto picks unsloth wherever it imports).
# bitsandbytes is slimmed to the libraries torch 2.11+cu130 loads there (cpu, cuda130, cuda132): its wheel
# carries 16 GPU builds, 43 MB, and the two folders together must fit one call.
# Python 3.12, manylinux x86_64, no dependencies resolved (--no-deps): the machine already has torch 2.11,
# transformers 5.17, peft, accelerate, pyarrow, pandas, ... (../shared/GPU.md). One version of each package.
# trl is 1.15.0 for both: unsloth pins trl <= 1.15.0, and two versions would stop the whole install.
# .whl/ is in .gitignore.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"

CORE="bitsandbytes==0.50.2 trl==1.15.0 datasets==4.8.0 dill==0.4.0 multiprocess==0.70.18
 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 liger-kernel==0.8.5"
UNSLOTH="unsloth==2026.10.9 unsloth_zoo==2026.10.9 torchao==0.18.0 tyro==1.0.17 docstring_parser==0.18.0
 shtab==1.13.0 typeguard==4.6.1 cut_cross_entropy==25.1.1 msgspec==0.22.0 hf_transfer==0.1.9 diffusers==0.42.1
 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0
 json5==0.17.3 nest_asyncio==1.6.0 structlog==26.1.0"
BNB_KEEP="libbitsandbytes_cpu.so libbitsandbytes_cuda130.so libbitsandbytes_cuda132.so"

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
# bitsandbytes without the GPU builds torch+cu130 never loads (its RECORD keeps only what is left)
"$PYTHON" - .whl/core/bitsandbytes-*.whl $BNB_KEEP <<'PY'
import sys, zipfile, os
path, keep = sys.argv[1], set(sys.argv[2:])
drop = lambda n: n.endswith(".so") and os.path.basename(n) not in keep
with zipfile.ZipFile(path) as src:
    names = src.namelist()
    if not any(drop(n) for n in names):
        sys.exit(0)  # slimmed already
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for n in names:
            if drop(n):
                continue
            data = src.read(n)
            if n.endswith(".dist-info/RECORD"):
                data = b"".join(l + b"\n" for l in data.splitlines() if not drop(l.split(b",")[0].decode()))
            out.writestr(src.getinfo(n), data)
os.replace(tmp, path)
PY
# the tokenizer of the embedded model, without its weights: embedded_model_dir() finds config.json and stops there
home=.whl/core/spin_lite_home/SmolLM2-135M-Instruct
mkdir -p "$home"
src=$("$PYTHON" -c "from spin_lite.model import embedded_model_dir; print(embedded_model_dir())")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja \
         special_tokens_map.json; do
    [ -e "$src/$f" ] && cp "$src/$f" "$home/"
done
fetch .whl/unsloth $UNSLOTH

for d in .whl/core .whl/unsloth .whl; do
    size=$(du -sb "$d" | cut -f1)
    printf '%-14s %5.1f MiB  %s\n' "$d" "$(echo "$size / 1048576" | bc -l)" "$(find "$d" -name '*.whl' | wc -l) wheels"
done
size=$(du -sb .whl | cut -f1)
[ "$size" -le $((60 * 1048576)) ] || { echo ".whl is over 60 MiB: a device call carries 64 MiB with the repo" >&2; exit 1; }
