#!/usr/bin/env bash
# The scale benchmark (issue 12; see the README's Performance section): builds the release
# operator and the bench binary, then runs it on a fresh local control plane with the test
# support's stand-in. Arguments go to the bench binary (`--help` lists them), e.g.
#   hack/bench.sh --connections 10000 --window 300 --json target/bench-10000.json
# Not a test: it is not part of `make test` (whose clippy run still builds it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Captured first so that a failing tools.sh stops here (set -e).
exports=$(hack/tools.sh)
eval "$exports"

target=${CARGO_TARGET_DIR:-target}
cargo build --release --locked --bin tasklist-operator -p tasklist-operator
cargo build --release --locked -p bench
exec "$target/release/bench" --operator "$target/release/tasklist-operator" "$@"
