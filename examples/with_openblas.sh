#!/usr/bin/env bash
# Run a command with MLX's CPU matrix products going through OpenBLAS.
#
#   examples/with_openblas.sh python -m mlx_memosight.bench ...
#
# MLX's Linux CPU wheel links the reference (Netlib) BLAS, which is slow for the
# few-row products of a decoding pass: there a pass costs more with every token
# it carries, and drafting several tokens per pass cannot pay
# (examples/pass_cost.py shows the growth). OpenBLAS exports the same symbols;
# put in front with LD_PRELOAD, it serves MLX's calls in place of the wheel's
# copy. Debian / Ubuntu only: the packages come from the system's apt sources
# with `apt-get download` (no root needed) and are unpacked under
# ${MLX_MEMOSIGHT_CACHE:-~/.cache/mlx-memosight}/openblas. macOS needs none of
# this: MLX uses Accelerate there.
#
# OPENBLAS_NUM_THREADS defaults to 1: the products of a decoding pass are too
# small to share, and MLX's own threads use the other cores.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
if [ "$(uname -s)" != "Linux" ]; then
    echo "$0: only needed on Linux (MLX uses Accelerate on macOS); running the command as is" >&2
    exec "$@"
fi
root="${MLX_MEMOSIGHT_CACHE:-$HOME/.cache/mlx-memosight}/openblas"
arch="$(dpkg --print-architecture 2>/dev/null || echo unknown)"
lib="$root/usr/lib/$(uname -m)-linux-gnu"
blas="$lib/openblas-pthread/libopenblas.so.0"
if [ ! -e "$blas" ]; then
    if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
        echo "$0: needs apt-get and dpkg (Debian / Ubuntu); elsewhere install OpenBLAS and" \
             "set LD_PRELOAD to its libopenblas.so yourself" >&2
        exit 1
    fi
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "fetching OpenBLAS ($arch) into $root" >&2
    (cd "$tmp" && apt-get download -q libopenblas0-pthread libgfortran5 libquadmath0 >&2) || {
        echo "$0: apt-get download failed; is an apt source reachable?" >&2
        exit 1
    }
    mkdir -p "$root.partial"
    for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$root.partial"; done
    rm -rf "$root" && mv "$root.partial" "$root"
fi
export LD_LIBRARY_PATH="$lib:$lib/openblas-pthread${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_PRELOAD="$blas${LD_PRELOAD:+:$LD_PRELOAD}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
exec "$@"
