# Container image of tasklist-operator. Build it with `make image` (hack/image.sh):
#
#   make image IMAGE=registry.example.com/tasklist-operator:0.1.0
#
# which builds the release binary with cargo, lays out the image's files with
# hack/image-rootfs.sh in a build context of their own (rootfs/: the binary, its shared
# libraries, Debian's CA bundle, /etc/passwd with user 65532 "nonroot", which the Helm chart's
# securityContext also pins), and runs this file with buildah. The node tests build, push and
# run the image the same way (tests/node, docs/shipping.md).
#
# The image is FROM scratch, so nothing is pulled: it builds offline. By hand, with any
# builder (buildah, podman or docker take the same arguments):
#
#   hack/image-rootfs.sh target/release/tasklist-operator CONTEXT/rootfs
#   buildah build --file Dockerfile --tag IMAGE CONTEXT
FROM scratch
LABEL org.opencontainers.image.title="tasklist-operator" \
      org.opencontainers.image.description="Kubernetes operator that keeps applications logged in to Camunda's Tasklist API" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/camunda-community/tasklist-operator"
COPY rootfs/ /
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tasklist-operator"]
CMD ["run"]
