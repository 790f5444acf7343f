#!/usr/bin/env bash
# Builds the operator's container image from the Dockerfile with buildah, and the SBOM of
# its binary. `make image` runs it; so do the node tests (through the README's commands).
#
#   hack/image.sh IMAGE          e.g. registry.example.com/tasklist-operator:0.1.0
#
# 1. The release binary: `cargo build --release --locked`, or the file named by
#    TLO_OPERATOR_RELEASE_BINARY (the node tests set it: cargo's lock is theirs meanwhile).
# 2. The build context: hack/image-rootfs.sh lays out the image's files in $out/context/rootfs.
# 3. `buildah build` of the Dockerfile (FROM scratch: nothing is pulled, it builds offline),
#    with every timestamp at 0, so the same binary gives the same image digest.
# 4. The SBOM: CycloneDX JSON of the binary's crates (cargo-cyclonedx, pinned in
#    hack/tools.sh), the normal dependencies for this platform, in $out/tasklist-operator.cdx.json.
#
# $out is TLO_IMAGE_OUT, or <cargo target folder>/image. Where the image is stored is
# buildah's business (containers-storage; CONTAINERS_STORAGE_CONF picks another store).
# The last lines on stdout are `image:`, `digest:`, `size:` and `sbom:`; progress goes to stderr.
set -euo pipefail

repository=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${1:?usage: hack/image.sh IMAGE (e.g. registry.example.com/tasklist-operator:0.1.0)}
target_dir=${CARGO_TARGET_DIR:-$repository/target}
out=${TLO_IMAGE_OUT:-$target_dir/image}

log() { echo "image: $*" >&2; }
seconds_since() { echo "$(( $(date +%s%N) / 1000000 - $1 ))" | awk '{ printf "%.1f", $1 / 1000 }'; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

tools=$("$repository/hack/tools.sh" image)
eval "$tools"

binary=${TLO_OPERATOR_RELEASE_BINARY:-}
if [[ -z $binary ]]; then
  log "cargo build --release --locked --bin tasklist-operator"
  (cd "$repository" && cargo build --release --locked --bin tasklist-operator >&2)
  binary=$target_dir/release/tasklist-operator
fi
[[ -x $binary ]] || { log "$binary is not an executable file"; exit 1; }

rm -rf "$out/context"
mkdir -p "$out"
"$repository/hack/image-rootfs.sh" "$binary" "$out/context/rootfs"

started=$(now_ms)
log "buildah build --file Dockerfile --tag $image"
"$TLO_BUILDAH" build --quiet --timestamp 0 --file "$repository/Dockerfile" --tag "$image" \
  --iidfile "$out/image-id" "$out/context" >&2
build_seconds=$(seconds_since "$started")
digest=$("$TLO_BUILDAH" inspect --type image --format '{{.FromImageDigest}}' "$image")
size=$("$TLO_BUILDAH" images --format '{{.Size}}' "$image" | head -n1)

# cargo-cyclonedx writes one file per workspace member, next to its Cargo.toml; a name of
# this run's own keeps two runs apart, and only the operator's is kept.
sbom_name="tasklist-operator-sbom-$$"
cleanup_sboms() { find "$repository" -maxdepth 3 -name "$sbom_name.json" -not -path '*/target/*' -delete; }
trap cleanup_sboms EXIT
log "cargo cyclonedx (SBOM of the binary)"
CARGO_NET_OFFLINE=true "$TLO_CARGO_CYCLONEDX" cyclonedx --quiet --manifest-path "$repository/Cargo.toml" \
  --format json --spec-version 1.5 --all --no-build-deps \
  --target "$(rustc -vV | sed -n 's/^host: //p')" --override-filename "$sbom_name" >&2
mv "$repository/$sbom_name.json" "$out/tasklist-operator.cdx.json"

log "built in ${build_seconds} s (buildah, from the rootfs)"
echo "image: $image"
echo "digest: $digest"
echo "size: $size"
echo "sbom: $out/tasklist-operator.cdx.json"
