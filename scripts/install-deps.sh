#!/usr/bin/env bash
# Install what the tests, the fuzz targets and the demo need, when missing: the real NBD peers
# qemu-nbd (qemu-utils), nbdkit, nbdinfo/nbdcopy (libnbd-bin); openssl; python3 with venv; a
# C++ compiler (libfuzzer-sys builds libFuzzer); and the official XenAPI Python SDK (PyPI
# package XenAPI), which checks the XenServer simulator, into the project's virtual
# environment .venv/ (the SDK test runs .venv/bin/python3); and s3s-fs (crates.io), the S3
# server the object-storage tests start. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v openssl >/dev/null || need+=(openssl)
command -v g++ >/dev/null || need+=(g++)
if ! command -v python3 >/dev/null; then
    need+=(python3 python3-venv)
elif ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    # Debian splits ensurepip, which `python3 -m venv` needs, into python3-venv.
    need+=(python3-venv)
fi
if ((${#need[@]})); then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    echo "installing: ${need[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

venv=.venv
if ! "$venv/bin/python3" -c 'import XenAPI' 2>/dev/null; then
    echo "installing: XenAPI (PyPI) into $venv/" >&2
    # --clear: a venv left half-made (or made by another python) starts afresh.
    python3 -m venv --clear "$venv"
    "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check XenAPI
fi

# s3s-fs at a known version: (re)installed when missing or different. 0.14.1 is the newest
# that builds with Rust 1.95 (0.15 and later need 1.96).
S3S_FS_VERSION=0.14.1
if [ "$(s3s-fs --version 2>/dev/null)" != "s3s-fs $S3S_FS_VERSION" ]; then
    echo "installing: s3s-fs $S3S_FS_VERSION (crates.io)" >&2
    cargo install s3s-fs --locked --force --features binary --version "$S3S_FS_VERSION"
fi
