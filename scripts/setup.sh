#!/usr/bin/env bash
# Installs what building and testing d402 needs on a fresh machine of the CI kind
# (Debian, rustup present, RUSTUP_AUTO_INSTALL=0). Idempotent: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
say "Rust $toolchain with rustfmt, clippy, rust-src and the wasm targets"
rustup set auto-self-update disable >/dev/null 2>&1 || true
rustup toolchain install "$toolchain" --profile minimal --no-self-update \
  --component rustfmt,clippy,rust-src \
  --target wasm32-wasip2,wasm32-unknown-unknown >&2

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >&2
fi
