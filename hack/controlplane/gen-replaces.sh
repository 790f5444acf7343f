#!/usr/bin/env bash
# Prints the replace block for a k8s.io/kubernetes release: every staging module
# pinned to the matching v0.x.y. Usage: gen-replaces.sh v1.34.4
set -euo pipefail
version=${1:?usage: gen-replaces.sh v1.X.Y}
staging=v0.${version#v1.}
mod=$(go mod download -json "k8s.io/kubernetes@${version}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
echo 'replace ('
grep -E '^\s+k8s.io/[a-z-]+ => ./staging' "$mod" | sed -E "s#^\s+(k8s.io/[a-z-]+) => .*#\t\1 => \1 ${staging}#"
echo ')'
