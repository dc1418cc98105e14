#!/usr/bin/env bash
# The main job: installs what d402 needs, builds it, and runs the local network demo,
# `d402 devnet`: a bootstrap, a validator, three workers offering web.page_to_markdown@1
# (registered with a 10% creator commission) and a gateway on loopback, then one paid task
# through the x402 flow, with the Markdown, the workers, the quorum, the split and the
# balances. Extra arguments are passed to `d402 devnet` (e.g. --keep-running, --dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked --bin d402 >&2
exec "${CARGO_TARGET_DIR:-target}/release/d402" devnet "$@"
