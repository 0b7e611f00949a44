#!/usr/bin/env bash
# Builds the root filesystem of the offline runtime image, for hosts that cannot
# pull from a registry: a minimal Debian (debootstrap) plus the pinned Python
# packages, installed from the host so that nothing is fetched inside a container.
#
#   images/build_rootfs.sh ROOTFS_DIR REQUIREMENTS_TXT
#
# Needs root (debootstrap), uv ($UV or on PATH), a Debian mirror and a Python index. The mirror
# is the one this host's apt is configured with for the suite (its proxy too), or AR_DEBIAN_MIRROR.
# Prints one line per step; sandbox/images.py imports the result.
set -euo pipefail

rootfs=${1:?usage: build_rootfs.sh ROOTFS_DIR REQUIREMENTS_TXT}
requirements=${2:?usage: build_rootfs.sh ROOTFS_DIR REQUIREMENTS_TXT}
suite=bookworm # Python 3.11, the project's interpreter
# python-is-python3: commands say `python`; gcc, g++, libpython3.11-dev: torch.compile
# (Inductor on CPU, Triton on GPU) compiles C/C++ at run time.
packages=python3,python-is-python3,coreutils,util-linux,gcc,g++,libpython3.11-dev

step() { printf '[rootfs] %s\n' "$*"; }

# What apt itself uses (sources.list or deb822 .sources alike): "500 URI bookworm/main amd64 Packages".
configured_mirror() {
    apt-cache policy 2>/dev/null | awk -v want="$suite/main" '$3 == want { print $2; exit }'
}
mirror=${AR_DEBIAN_MIRROR:-$(configured_mirror)}
if [ -z "$mirror" ]; then
    echo "this host's apt has no Debian $suite source; set AR_DEBIAN_MIRROR to a Debian mirror URL" >&2
    exit 1
fi
if [ -z "${http_proxy:-}" ]; then # debootstrap reads the environment, not apt's configuration
    eval "$(apt-config shell http_proxy Acquire::http::Proxy 2>/dev/null)"
    if [ -n "${http_proxy:-}" ]; then export http_proxy; fi
fi

if ! command -v debootstrap >/dev/null; then
    step "installing debootstrap on the host"
    apt-get install -y -qq debootstrap >/dev/null
fi

step "debootstrap --variant=minbase $suite ($mirror)"
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >/dev/null

step "installing pinned Python packages into /opt/deps"
# The glibc of bookworm is 2.36: the same wheels the host's lock resolves to.
"${UV:-uv}" pip install --quiet --no-deps --require-hashes --link-mode=copy \
    --target "$rootfs/opt/deps" \
    --python-version 3.11 --python-platform x86_64-manylinux_2_36 \
    -r "$requirements"

step "trimming docs, locales, package caches and package tests"
rm -rf "$rootfs"/usr/share/{doc,man,info,locale,lintian,linda} \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/* \
    "$rootfs"/opt/deps/bin
find "$rootfs/opt/deps" -mindepth 2 -type d -name tests -not -path '*/torch/*' -prune \
    -exec rm -rf {} +
find "$rootfs" -depth -type d -name __pycache__ -exec rm -rf {} +

step "compiling bytecode with the image's interpreter (the root filesystem is read-only at run time)"
chroot "$rootfs" python3 -m compileall -q -j 0 /usr/lib/python3.11 /opt/deps

step "root filesystem ready: $(du -sh "$rootfs" | cut -f1)"
