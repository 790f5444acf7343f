# The two commands of the README. Both build whatever is missing first (hack/tools.sh
# caches the control plane, helm and Keycloak outside the checkout, keyed by version).

.PHONY: demo test soak bench tools crd chart-docs image

## Run the operator end to end on a local control plane with a stand-in Tasklist and
## Keycloak, apply examples/, print the status; Ctrl-C stops and cleans up everything.
demo:
	hack/demo.sh $(ARGS)

## Run every test: formatting, lints, unit, integration, end-to-end and chart tests.
test:
	hack/test.sh

## The consumer measurement with a real Keycloak's tokens (300 s, refreshBefore 120 s, five
## refreshes: about 15 minutes), on the real node. Needs root, like `make test`.
soak:
	hack/soak.sh

## The scale benchmark (README, Performance): N connections (default 1000) on a local control
## plane, the release operator and a stand-in; prints a table and writes target/bench.json.
## Not a test. More flags through ARGS, e.g. `make bench N=10000 ARGS="--window 300"`;
## SHARDS=2 adds a cold start split between two operator processes (each one's RSS).
N ?= 1000
SHARDS ?= 1
bench:
	hack/bench.sh --connections $(N) --shards $(SHARDS) $(ARGS)

## Build the container image from the Dockerfile with buildah, and the SBOM of its binary;
## prints the image, its digest, its size and the SBOM's path (hack/image.sh, docs/shipping.md).
IMAGE ?= ghcr.io/camunda-community/tasklist-operator:0.1.0
image:
	hack/image.sh $(IMAGE)

## Build or fetch the test components only.
tools:
	hack/tools.sh >/dev/null

## Regenerate the committed CRD YAML (crds/ and the chart's copy).
crd:
	cargo run -q -- crd > crds/tasklistconnection.yaml
	cp crds/tasklistconnection.yaml charts/tasklist-operator/crds/tasklistconnection.yaml

## Regenerate the values table in charts/tasklist-operator/README.md from values.yaml.
chart-docs:
	TLO_WRITE_CHART_DOCS=1 cargo test -q --test chart_docs
