# syntax=docker/dockerfile:1
#
# Container image of tasklist-operator.
#
#   docker build -t ghcr.io/camunda-community/tasklist-operator:0.1.0 .
#
# Needs BuildKit (the default builder since Docker 23; also podman/buildah) for the cache
# mounts below, and Cargo.lock in the build context (the build is --locked).
#
# The runtime image is built FROM scratch by hack/image-rootfs.sh, the same recipe the node
# tests use to build the image they run on a real kubelet: the binary, its shared libraries
# and Debian's CA bundle, and user 65532 ("nonroot"), which the Helm chart's securityContext
# also pins. The node tests read USER, ENTRYPOINT, CMD and EXPOSE from this file for their
# image, and check that the runtime stage is exactly "COPY the rootfs" (tests/node).

# ---- build ----------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# The whole workspace (see .dockerignore): Cargo.toml names tests/support as a member, and
# cargo needs every member's manifest to resolve the workspace.
COPY . .
# The registry and target folders are cache mounts, so rebuilds reuse downloaded crates and
# compiled dependencies; the binary is copied out of the cache mount within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tasklist-operator \
 && install -D -m 0755 target/release/tasklist-operator /out/tasklist-operator
RUN hack/image-rootfs.sh /out/tasklist-operator /rootfs

# ---- runtime --------------------------------------------------------------------------
FROM scratch
LABEL org.opencontainers.image.title="tasklist-operator" \
      org.opencontainers.image.description="Kubernetes operator that keeps applications logged in to Camunda's Tasklist API" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /rootfs/ /
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tasklist-operator"]
CMD ["run"]
