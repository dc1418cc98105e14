#!/usr/bin/env bash
# Rebuilds web.page_to_markdown@1 with the pinned toolchain and checks that the module's
# raw CID is the one committed (page_to_markdown.wasm and capability.json).
#
#   ./build.sh           rebuild and compare; exit 1 if the CID differs
#   ./build.sh --update  rebuild, overwrite page_to_markdown.wasm and the CID in capability.json
#
# Needs: rustup toolchain 1.99.1 with target wasm32-unknown-unknown, python3.
set -euo pipefail
cd "$(dirname "$0")"
here="$(pwd)"
toolchain=1.99.1
target=wasm32-unknown-unknown
out_dir="${CARGO_TARGET_DIR:-$here/target}"

# Reproducibility: only this source and the toolchain may influence the bytes.
unset RUSTC_WRAPPER CARGO_BUILD_RUSTFLAGS CARGO_ENCODED_RUSTFLAGS \
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS CARGO_PROFILE_RELEASE_DEBUG || true
export SOURCE_DATE_EPOCH=0
export RUSTFLAGS="--remap-path-prefix=$here=/page_to_markdown -C debuginfo=0"
CARGO_TARGET_DIR="$out_dir" cargo "+$toolchain" build --locked --release --target "$target" \
  --lib --quiet
built="$out_dir/$target/release/page_to_markdown.wasm"

cid_of() {
  python3 - "$1" <<'PY'
import base64, hashlib, sys
digest = hashlib.sha256(open(sys.argv[1], "rb").read()).digest()
raw = bytes([0x01, 0x55, 0x12, 0x20]) + digest  # CIDv1, raw, sha2-256, 32 bytes
print("b" + base64.b32encode(raw).decode().lower().rstrip("="))
PY
}

new_cid="$(cid_of "$built")"
manifest_cid="$(python3 -c 'import json,sys; print(json.load(open("capability.json"))["implementation"]["cid"])')"

if [[ "${1:-}" == "--update" ]]; then
  cp "$built" page_to_markdown.wasm
  python3 - "$new_cid" <<'PY'
import json, sys
m = json.load(open("capability.json"))
m["implementation"]["cid"] = sys.argv[1]
open("capability.json", "w").write(json.dumps(m, indent=2, ensure_ascii=False) + "\n")
PY
  echo "updated: $new_cid ($(stat -c %s page_to_markdown.wasm) bytes)"
  echo "now re-sign capability.registration.json (d402 capability register --file capability.json --namespace web …)"
  exit 0
fi

committed_cid="$(cid_of page_to_markdown.wasm)"
echo "built:     $new_cid"
echo "committed: $committed_cid"
echo "manifest:  $manifest_cid"
if [[ "$new_cid" != "$committed_cid" || "$new_cid" != "$manifest_cid" ]]; then
  echo "CID mismatch: the committed module is not what this source builds to" >&2
  exit 1
fi
echo "ok: page_to_markdown.wasm rebuilds to the committed CID"
