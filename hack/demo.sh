#!/usr/bin/env bash
# The operator's main job end to end, on a local default: starts a control plane, a
# stand-in Tasklist (with a SaaS-style token endpoint) and Keycloak, installs the CRD,
# runs the operator, applies examples/ (pointed at the local servers), waits for Ready
# and prints the status. Runs until Ctrl-C, then stops everything it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Captured first so that a failing tools.sh stops here (set -e), not in a test later.
# `demo`: everything but the node, which only the node tests need.
exports=$(hack/tools.sh demo)
eval "$exports"
cargo build --locked --bin tasklist-operator -p tasklist-operator
exec cargo run --locked -q -p tasklist-testsupport --bin demo -- "$@"
