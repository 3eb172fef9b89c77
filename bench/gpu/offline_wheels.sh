#!/bin/bash
# Wheels for running bench/gpu/run.py on a GPU machine that has no network and whose
# image already holds a CUDA torch, numpy, networkx, msgpack, uvloop, pillow, matplotlib,
# prometheus_client, rich, accelerate, safetensors, tokenizers and huggingface_hub
# (see README.md, "Offline GPU machine"). Run here, where pip reaches a registry:
#
#     bench/gpu/offline_wheels.sh .whl 3.12
#
# CBC's wheel (cbcbox) is ~190 MB; only the AVX2 build's libraries that libCbc needs are
# kept (cbcbox-trim.tar.gz, ~12 MB): set CBCBOX_BUILD=avx2 where it is unpacked.
set -euo pipefail
DIR=${1:-.whl}
PY=${2:-3.12}
mkdir -p "$DIR"
PLAT=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
    manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
    PLAT+=(--platform "$p")
done
# The project's pins where pyproject.toml has them; the rest as resolved here.
for w in diffusers==0.42.1 transformers==5.23.0 pyzmq msgspec mip cffi pycparser highsbox \
    structlog importlib_metadata; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
        --implementation cp "${PLAT[@]}" -d "$DIR" "$w"
done
TMP=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp "${PLAT[@]}" -d "$TMP" cbcbox
(cd "$TMP" && unzip -q cbcbox-*.whl)
SRC=$(find "$TMP" -type d -name cbcbox -path '*purelib*' | head -1)
mkdir -p "$TMP/trim/cbcbox/cbc_dist_avx2/lib"
cp "$SRC/__init__.py" "$TMP/trim/cbcbox/"
for f in libCbc.so libCgl.so.0 libClp.so.0 libCoinUtils.so.0 libOsi.so.0 libOsiClp.so.0 \
    libopenblas.so.0 libgfortran.so.5 libquadmath.so.0; do
    cp "$SRC/cbc_dist_avx2/lib/$f" "$TMP/trim/cbcbox/cbc_dist_avx2/lib/"
done
tar czf "$DIR/cbcbox-trim.tar.gz" -C "$TMP/trim" cbcbox
rm -rf "$TMP"
du -sh "$DIR"
