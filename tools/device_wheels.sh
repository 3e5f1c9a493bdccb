#!/usr/bin/env bash
# Wheels for an offline JAX GPU machine that has jax, flax, optax, orbax-checkpoint, absl-py,
# tqdm, scikit-learn, matplotlib and Pillow (and the common six, protobuf, psutil, PyYAML,
# wrapt, etils) but not the rest of tlresearch's core: TFDS, the part of its dependencies
# that reading the project's ArrayRecord datasets imports, and ml-collections.
# Run here, with a network; carry the folder; there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site WHEELDIR/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# Usage: tools/device_wheels.sh [WHEELDIR (default .whl)] [PYTHON_VERSION (default 3.12)]
set -euo pipefail
dir="${1:-.whl}" py="${2:-3.12}"
mkdir -p "$dir"
# pyarrow and simple_parsing are TFDS requirements that this path never imports: left out.
pkgs=(tensorflow-datasets==4.9.10 tensorflow-metadata array_record dm-tree immutabledict
      importlib_resources promise termcolor toml googleapis-common-protos ml-collections)
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do plat+=(--platform "$p"); done
for pkg in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
      --implementation cp "${plat[@]}" -d "$dir" "$pkg" \
    || python3 -m pip wheel -q --no-deps -w "$dir" "$pkg"  # pure Python, sdist only (promise)
done
du -sh "$dir"
