#!/usr/bin/env bash
# The test command: installs what the tests need, then checks formatting, lints and runs
# every test of the workspace. This is what CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
export RUST_BACKTRACE=1
say() { printf '==> %s\n' "$*" >&2; }

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "web.page_to_markdown@1: rebuild from source and check the committed module's CID"
bash examples/page_to_markdown/build.sh
say "cargo test"
cargo test --workspace --locked
