#!/usr/bin/env bash
# Lays out the container image's root filesystem, which the Dockerfile (FROM scratch) copies
# as a whole: hack/image.sh (`make image`, also run by the node tests) calls it.
#
#   hack/image-rootfs.sh BINARY ROOTFS
#
# ROOTFS (created, must not exist yet) gets exactly what the binary needs to run, taken from
# the Debian system the binary was built on:
#   /usr/local/bin/tasklist-operator     the binary
#   its shared libraries and the dynamic loader, at their paths (as `ldd` lists them)
#   /etc/ssl/certs/ca-certificates.crt   Debian's ca-certificates bundle (spec.tls uses the
#                                        bundled Mozilla roots; this serves other tools' TLS)
#   /etc/passwd, /etc/group              user and group "nonroot", 65532
# Everything is owned by root and not writable by the runtime user.
set -euo pipefail

binary=${1:?usage: hack/image-rootfs.sh BINARY ROOTFS}
rootfs=${2:?usage: hack/image-rootfs.sh BINARY ROOTFS}
ca_bundle=/etc/ssl/certs/ca-certificates.crt

[[ -x $binary ]] || { echo "image-rootfs: $binary is not an executable file" >&2; exit 1; }
[[ -e $rootfs ]] && { echo "image-rootfs: $rootfs exists already" >&2; exit 1; }
[[ -r $ca_bundle ]] || { echo "image-rootfs: $ca_bundle is missing (apt-get install ca-certificates)" >&2; exit 1; }

mkdir -p "$rootfs"/{usr/local/bin,etc/ssl/certs}
install -m 0755 "$binary" "$rootfs/usr/local/bin/tasklist-operator"

# Every absolute path ldd prints is a library or the loader; copy each to the same path,
# following symlinks so that the image holds the files themselves.
libraries=$(ldd "$binary" | grep -o '/[^ ]*' | sort -u)
[[ -n $libraries ]] || { echo "image-rootfs: ldd lists no libraries for $binary" >&2; exit 1; }
for library in $libraries; do
  mkdir -p "$rootfs$(dirname "$library")"
  cp -L "$library" "$rootfs$library"
done

cp -L "$ca_bundle" "$rootfs$ca_bundle"
echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin' >"$rootfs/etc/passwd"
echo 'nonroot:x:65532:' >"$rootfs/etc/group"
