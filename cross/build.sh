#!/usr/bin/env bash
# Build static release binaries of edgeferry for ARM gateways.
#
#   cross/build.sh                      # both default targets
#   cross/build.sh aarch64-unknown-linux-musl
#   EDGEFERRY_BUILDER=zigbuild cross/build.sh   # cargo-zigbuild instead of cross (no Docker)
#
# Needs, for the default builder: cross (cargo install cross) and a running Docker or Podman
# engine. For zigbuild: cargo-zigbuild, zig, and `rustup target add <target>`.
# See cross/README.md.
set -euo pipefail

readonly DEFAULT_TARGETS=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)

usage() {
    cat <<USAGE
usage: $(basename "$0") [TARGET...]

Builds 'edgeferry' with the release profile for each TARGET (default: ${DEFAULT_TARGETS[*]})
and prints the path, 'file' output, size and SHA-256 of each binary.

Environment:
  EDGEFERRY_BUILDER  cross (default) or zigbuild
  EDGEFERRY_FULL     1: the full build (with 'edgeferry collect', the embedded broker and
                     'edgeferry demo'); default: the gateway-only build (--no-default-features)
  CROSS_CONFIG       cross config file (default: cross/Cross.toml of this repository)
  CARGO_TARGET_DIR   output root (default: target/)
USAGE
}

for arg in "$@"; do
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        -*) echo "error: unknown option '$arg'" >&2; usage >&2; exit 64 ;;
    esac
done

if (($# > 0)); then
    targets=("$@")
else
    targets=("${DEFAULT_TARGETS[@]}")
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# cross reads ./Cross.toml by default; ours lives in cross/. Absolute path, so it does not
# depend on the directory cross is started from.
export CROSS_CONFIG="${CROSS_CONFIG:-$repo_root/cross/Cross.toml}"

# Gateways get the gateway-only build: no central receiver, no embedded broker (smaller; see
# docs/DECISIONS.md). EDGEFERRY_FULL=1 builds everything.
features=(--no-default-features)
if [[ "${EDGEFERRY_FULL:-0}" == 1 ]]; then
    features=()
fi

builder="${EDGEFERRY_BUILDER:-cross}"
case "$builder" in
    cross)
        command -v cross >/dev/null 2>&1 || {
            echo "error: 'cross' not found; install it with: cargo install cross --locked" >&2
            echo "       (or: cargo install cross --git https://github.com/cross-rs/cross)" >&2
            exit 69
        }
        build() { cross build --release --locked "${features[@]}" --target "$1" --bin edgeferry; }
        ;;
    zigbuild)
        command -v cargo-zigbuild >/dev/null 2>&1 || {
            echo "error: 'cargo-zigbuild' not found; install it with: cargo install cargo-zigbuild --locked" >&2
            exit 69
        }
        build() {
            rustup target add "$1"
            cargo zigbuild --release --locked "${features[@]}" --target "$1" --bin edgeferry
        }
        ;;
    *)
        echo "error: EDGEFERRY_BUILDER must be 'cross' or 'zigbuild', not '$builder'" >&2
        exit 64
        ;;
esac

target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"
built=()
for target in "${targets[@]}"; do
    echo "==> building edgeferry for $target with $builder" >&2
    build "$target"
    built+=("$target_dir/$target/release/edgeferry")
done

echo
echo "Built:"
for bin in "${built[@]}"; do
    if [[ ! -x "$bin" ]]; then
        echo "error: expected binary missing: $bin" >&2
        exit 1
    fi
    size=$(stat -c %s "$bin")
    echo "  $bin"
    if command -v file >/dev/null 2>&1; then
        desc=$(file -b "$bin")
        echo "    file:   $desc"
        # Rust's musl targets link statically by default; catch a toolchain that did not.
        if [[ "$desc" != *"statically linked"* && "$desc" != *"static-pie linked"* ]]; then
            echo "warning: $bin is not statically linked" >&2
        fi
    fi
    echo "    size:   $size bytes ($((size / 1024)) KiB)"
    echo "    sha256: $(sha256sum "$bin" | cut -d' ' -f1)"
done
