#!/usr/bin/env bash
# The main job: installs what d402 needs, builds it, and runs the local network demo.
# Extra arguments are passed to `d402 devnet`.
#
# Until the paid-task devnet lands (see README "Status"), this runs what exists: it
# publishes a capability exactly as the operator guide says (template, validate, signed
# registration with a 10% creator commission), verifies the registration, and runs the
# built-in web.page_to_markdown@1 the way a worker does: headless Chromium snapshots a page
# served on loopback and the sandboxed Wasm module turns it into Markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked --bin d402 >&2
d402=./target/release/d402

if "$d402" devnet --help >/dev/null 2>&1; then
  exec "$d402" devnet "$@"
fi

echo "d402 devnet (the paid-task network) is not built yet; running what exists." >&2
work=$(mktemp -d "${TMPDIR:-/tmp}/d402-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
set -x
"$OLDPWD/$d402" protocol
"$OLDPWD/$d402" capability template --id example.extract_product --version 1 > capability.json
"$OLDPWD/$d402" capability validate --file capability.json
"$OLDPWD/$d402" capability register \
  --file capability.json \
  --state ./state/publisher \
  --namespace example \
  --creator-commission-bps 1000 \
  --creator-solana-wallet 4Nd1mBQtrMJVYVfKf2PJy9NZUZdTAsp7D4xWLs4gDB4T \
  --creator-evm-wallet 0x000000000000000000000000000000000000c0de \
  > capability.registration.json
"$OLDPWD/$d402" capability verify --file capability.registration.json --manifest capability.json

# A small page on loopback, snapshotted by Chromium and converted by the Wasm capability.
set +x
mkdir -p site && cp "$OLDPWD/examples/page_to_markdown/fixtures/blog_post.html" site/index.html
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory site >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
set -x
"$OLDPWD/$d402" capability run \
  --manifest "$OLDPWD/examples/page_to_markdown/capability.json" \
  --wasm "$OLDPWD/examples/page_to_markdown/page_to_markdown.wasm" \
  --input "{\"url\":\"http://127.0.0.1:$port/\"}" \
  --snapshotter playwright --allow-loopback
