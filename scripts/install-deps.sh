#!/usr/bin/env bash
# Install the real NBD peers the tests and the demo use, from Debian packages, when missing:
# qemu-nbd (qemu-utils), nbdkit, nbdinfo/nbdcopy (libnbd-bin), openssl, python3; and the
# official XenAPI Python SDK (PyPI package XenAPI), which checks the XenServer simulator.
set -euo pipefail
need=()
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if ((${#need[@]})); then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    echo "installing: ${need[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! python3 -c 'import XenAPI' 2>/dev/null; then
    echo "installing: XenAPI (PyPI)" >&2
    python3 -m pip install --quiet --disable-pip-version-check XenAPI 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --user XenAPI 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages XenAPI
fi
