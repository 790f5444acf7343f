#!/usr/bin/env bash
# Every test: the dependencies' licences, formatting, lints, unit, integration and end-to-end tests (a real
# kube-apiserver, etcd, kube-controller-manager, Keycloak and helm, built or fetched by
# hack/tools.sh), and the node tests (the image and the chart on a real kubelet, with
# containerd, pulled from a registry; they need root). A test that cannot find a component fails; nothing is skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> components (hack/tools.sh)"
# Captured first so that a failing tools.sh stops here (set -e), not in a test later.
exports=$(hack/tools.sh)
eval "$exports"

# Every crate of Cargo.lock, for every platform, in cargo's cache: the licence check and the
# SBOM (`make image` in the node tests, inside a network namespace with no way out) read
# their manifests offline.
echo "==> cargo fetch --locked"
cargo fetch --locked

echo "==> cargo deny check licenses (deny.toml)"
"$TLO_CARGO_DENY" --frozen check licenses

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> hack/tools.sh run twice at once"
hack/test-tools-concurrency.sh

echo "==> cargo build --release (the node tests put it into the image)"
cargo build --release --locked --bin tasklist-operator

echo "==> cargo test"
cargo test --workspace --locked --no-fail-fast
