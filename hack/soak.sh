#!/usr/bin/env bash
# The long consumer measurement of the node tests (tests/node/consumer.rs): an application
# Pod reads the mounted Secret while the operator refreshes a real Keycloak's tokens (300 s,
# its default lifetime) five times, 120 s before expiry. Prints the figures at the end.
# Override with TLO_NODE_CONSUMER_KEYCLOAK, _TOKEN_SECONDS, _REFRESH_BEFORE_SECONDS, _CYCLES.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exports=$(hack/tools.sh)
eval "$exports"
cargo build --release --locked --bin tasklist-operator
export TLO_NODE_CONSUMER_KEYCLOAK=${TLO_NODE_CONSUMER_KEYCLOAK:-1}
export TLO_NODE_CONSUMER_TOKEN_SECONDS=${TLO_NODE_CONSUMER_TOKEN_SECONDS:-300}
export TLO_NODE_CONSUMER_REFRESH_BEFORE_SECONDS=${TLO_NODE_CONSUMER_REFRESH_BEFORE_SECONDS:-120}
export TLO_NODE_CONSUMER_CYCLES=${TLO_NODE_CONSUMER_CYCLES:-5}
cargo test --locked --test node -- --exact node::consumer_pod_reads_the_mounted_secret_through_refreshes
