#!/usr/bin/env bash
# Two runs of hack/tools.sh at once must not trip over each other (issue 11 §7): each
# component is built under a lock, in a scratch folder of its own, and renamed into place.
#
# Runs two `hack/tools.sh keycloak` at once against an empty cache folder (Keycloak is the
# cheapest component to make: Maven copies the distribution from its local repository and
# it is unpacked). Exactly one run must fetch it, the other must wait and find it cached,
# both must succeed, and no scratch folder may be left behind.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT

for run in 1 2; do
  TASKLIST_TOOLS_CACHE=$cache "$here/tools.sh" keycloak >"$cache/out.$run" 2>"$cache/err.$run" &
  pids[run]=$!
done
failed=0
for run in 1 2; do
  wait "${pids[run]}" || { echo "tools-concurrency: run $run failed:"; cat "$cache/err.$run"; failed=1; }
done
[[ $failed == 0 ]] || exit 1

fetched=$(cat "$cache"/err.* | grep -c 'fetching keycloak' || true)
cached=$(cat "$cache"/err.* | grep -c 'keycloak .* cached in' || true)
[[ $fetched == 1 && $cached == 1 ]] || {
  echo "tools-concurrency: expected one fetch and one cache hit, got $fetched fetch(es) and $cached hit(s):"
  cat "$cache"/err.*
  exit 1
}
version_dir=$(ls -d "$cache"/keycloak-* | grep -v partial)
[[ -x $version_dir/bin/kc.sh ]] || { echo "tools-concurrency: $version_dir has no bin/kc.sh"; exit 1; }
leftovers=$(ls -d "$cache"/*.partial.* 2>/dev/null || true)
[[ -z $leftovers ]] || { echo "tools-concurrency: scratch folders left behind: $leftovers"; exit 1; }
cmp -s "$cache/out.1" "$cache/out.2" || { echo "tools-concurrency: the two runs printed different paths"; exit 1; }
echo "tools-concurrency: two concurrent runs: one fetched Keycloak, one waited and found it cached"
