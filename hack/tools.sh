#!/usr/bin/env bash
# Builds (or finds, when cached) every external component the tests and the demo need:
# kube-apiserver, kube-controller-manager and etcd from hack/controlplane, helm from
# hack/helm, Keycloak's distribution from Maven Central, cargo-deny and cargo-cyclonedx from
# crates.io, Camunda's own clients (the JS SDK from npm, the Java client from Maven Central)
# for the recipes in examples/clients/; and installs the node's runtime and the image tools
# (buildah, skopeo, docker-registry, htpasswd) from Debian's packages.
#
# Everything lands in a cache folder keyed by version, outside the checkout, so a fresh
# clone reuses it:   ${TASKLIST_TOOLS_CACHE:-~/.cache/tasklist-operator}/<component>-<version>/
# A component whose folder is complete is not rebuilt.
#
# On success the last lines on stdout are `export NAME=path` lines for the test support
# (TLO_KUBE_APISERVER, TLO_KUBE_CONTROLLER_MANAGER, TLO_ETCD, TLO_HELM, TLO_KEYCLOAK_HOME,
# TLO_KEYCLOAK_JAVA, and for the node tests TLO_KUBELET, TLO_KUBE_PROXY, TLO_KUBE_SCHEDULER, TLO_KUBECTL,
# TLO_CONTAINERD, TLO_RUNC, TLO_CTR, TLO_CNI_BIN_DIR, for shipping the image TLO_BUILDAH,
# TLO_SKOPEO, TLO_REGISTRY, TLO_HTPASSWD, TLO_CARGO_DENY, TLO_CARGO_CYCLONEDX, and for
# tests/clients.rs TLO_CAMUNDA_JS_SDK, TLO_CAMUNDA_JAVA_CLIENT, TLO_NODE, TLO_JAVA, TLO_JAVAC);
# progress goes to stderr.
# Use:  eval "$(hack/tools.sh)"
#
# Two runs at once are safe: each component is built under an exclusive lock (flock on
# <cache>/.lock-<component>), in a folder of its own, renamed into place when complete. The
# second run waits for the lock, then finds the component cached.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${TASKLIST_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tasklist-operator}
mkdir -p "$cache"

# The pinned versions are read from the modules' own go.mod files, so bumping one there is enough.
module_version() { sed -n "s#^\s*$2 \(v[0-9.]*\).*#\1#p" "$here/$1/go.mod" | head -n1; }
kubernetes_version=$(module_version controlplane k8s.io/kubernetes)
helm_version=$(module_version helm helm.sh/helm/v3)
prometheus_version=$(module_version promtool github.com/prometheus/prometheus)
keycloak_version=26.7.3
# The clients' versions are pinned where the recipes declare them, so bumping one there is enough.
clients=$here/../examples/clients
js_sdk_version=$(sed -n 's#^\s*"@camunda8/sdk": "\([0-9.]*\)".*#\1#p' "$clients/js/package.json")
java_client_version=$(sed -n '/<artifactId>camunda-client-java</{n;s#^\s*<version>\([0-9.]*\)</version>#\1#p}' "$clients/java/pom.xml")
# Cargo subcommands from crates.io, built with --locked at these versions.
cargo_deny_version=0.20.2
cargo_cyclonedx_version=0.5.9

log() { echo "tools: $*" >&2; }

# Runs "$2..." while holding an exclusive lock named $1, so that concurrent runs of this
# script never build the same component into the same folder. The lock is released when
# the file descriptor closes, also when the script is killed.
with_lock() {
  local name=$1; shift
  local fd
  exec {fd}>"$cache/.lock-$name"
  flock "$fd"
  "$@"
  local status=$?
  exec {fd}>&-
  return $status
}

# Sets $work to a fresh, unique scratch folder next to $1 (the final folder). It is removed
# on exit unless it has been renamed into place by then.
new_scratch_next_to() {
  work=$(mktemp -d "$1.partial.XXXXXX")
  scratch_dirs+=("$work")
}
scratch_dirs=()
trap 'rm -rf "${scratch_dirs[@]}"' EXIT

build_control_plane() {
  local out="$cache/kubernetes-$kubernetes_version"
  if [[ -x $out/kube-apiserver && -x $out/kube-controller-manager && -x $out/etcd ]]; then
    log "control plane $kubernetes_version cached in $out"
    return
  fi
  log "building kube-apiserver, kube-controller-manager, etcd $kubernetes_version (cold: ~20 min on 2 cores)"
  local ldflags work
  ldflags=$(kubernetes_ldflags)
  new_scratch_next_to "$out"
  (
    cd "$here/controlplane"
    go build -ldflags "$ldflags" -o "$work/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
    go build -ldflags "$ldflags" -o "$work/kube-controller-manager" k8s.io/kubernetes/cmd/kube-controller-manager
    # A plain `go install` of etcd fails on its relative replaces; building it from this
    # module uses the versions kube-apiserver was tested with.
    go build -ldflags "-s -w" -o "$work/etcd" go.etcd.io/etcd/server/v3
  )
  rm -rf "$out" && mv "$work" "$out"
}

kubernetes_ldflags() {
  local minor=${kubernetes_version#v1.}; minor=${minor%%.*}
  local pkg=k8s.io/component-base/version
  local ldflags="-s -w -X $pkg.gitVersion=$kubernetes_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$kubernetes_version"
  echo "$ldflags"
}

# The node's Kubernetes components (and kubectl, to run the chart's hints as users would),
# from the same module and version as the control plane, in a folder of their own so that
# adding them never rebuilds the control plane.
build_node() {
  local out="$cache/node-$kubernetes_version"
  if [[ -x $out/kubelet && -x $out/kube-proxy && -x $out/kube-scheduler && -x $out/kubectl ]]; then
    log "node components $kubernetes_version cached in $out"
    return
  fi
  log "building kubelet, kube-proxy, kube-scheduler, kubectl $kubernetes_version (~5 min after the control plane)"
  local ldflags work
  ldflags=$(kubernetes_ldflags)
  new_scratch_next_to "$out"
  (
    cd "$here/controlplane"
    for component in kube-scheduler kube-proxy kubelet kubectl; do
      go build -ldflags "$ldflags" -o "$work/$component" "k8s.io/kubernetes/cmd/$component"
    done
  )
  rm -rf "$out" && mv "$work" "$out"
}

# The node's container runtime and CNI plugins come from Debian's packages.
node_runtime_present() {
  command -v containerd >/dev/null && command -v runc >/dev/null && command -v ctr >/dev/null \
    && [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]]
}

install_node_runtime() {
  if node_runtime_present; then
    log "containerd, runc and the CNI plugins are installed"
    return
  fi
  log "installing containerd, runc and containernetworking-plugins (apt-get)"
  local packages=(containerd runc containernetworking-plugins)
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >&2; then
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >&2
  fi
  node_runtime_present || { log "containerd, runc or the CNI plugins are still missing after apt-get"; return 1; }
}

# Shipping the image (make image, the node tests): buildah builds the Dockerfile, skopeo
# copies images, docker-registry is the CNCF Distribution registry the node tests push to and
# the kubelet pulls from, htpasswd (apache2-utils) writes its bcrypt password file.
image_tools_present() {
  command -v buildah >/dev/null && command -v skopeo >/dev/null && command -v docker-registry >/dev/null \
    && command -v htpasswd >/dev/null
}

install_image_tools() {
  if image_tools_present; then
    log "buildah, skopeo, docker-registry and htpasswd are installed"
    return
  fi
  log "installing buildah, skopeo, docker-registry and apache2-utils (apt-get)"
  local packages=(buildah skopeo docker-registry apache2-utils)
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" >&2; then
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" >&2
  fi
  image_tools_present || { log "buildah, skopeo, docker-registry or htpasswd is still missing after apt-get"; return 1; }
}

# A cargo subcommand from crates.io, `cargo install --locked` at a pinned version into
# <cache>/<crate>-<version>/bin. Its own target folder (never the project's CARGO_TARGET_DIR),
# and no fat LTO: these run on small inputs, and the build shares two cores.
build_cargo_tool() {
  local crate=$1 version=$2
  local out="$cache/$crate-$version"
  if [[ -x $out/bin/$crate ]]; then
    log "$crate $version cached in $out"
    return
  fi
  log "building $crate $version from crates.io (cargo install --locked)"
  local work
  new_scratch_next_to "$out"
  CARGO_TARGET_DIR="$work/target" CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    cargo install --locked --quiet --no-track --root "$work" --version "=$version" "$crate" >&2
  rm -rf "$work/target"
  rm -rf "$out" && mv "$work" "$out"
}

build_helm() {
  local out="$cache/helm-$helm_version"
  if [[ -x $out/helm ]]; then
    log "helm $helm_version cached in $out"
    return
  fi
  log "building helm $helm_version"
  local work
  new_scratch_next_to "$out"
  (
    cd "$here/helm"
    # Release builds stamp the Kubernetes version helm assumes for `kubeVersion` checks;
    # without it helm claims v1.20 and refuses charts that need a newer cluster.
    local client_go minor
    client_go=$(module_version helm k8s.io/client-go)
    minor=${client_go#v0.}; minor=${minor%%.*}
    local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
    ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
    ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
    go build -ldflags "$ldflags" -o "$work/helm" helm.sh/helm/v3/cmd/helm
  )
  rm -rf "$out" && mv "$work" "$out"
}

fetch_keycloak() {
  local out="$cache/keycloak-$keycloak_version"
  if [[ -x $out/bin/kc.sh ]]; then
    log "keycloak $keycloak_version cached in $out"
    return
  fi
  log "fetching keycloak $keycloak_version from Maven Central"
  local work
  new_scratch_next_to "$out"
  mvn -q -B dependency:copy \
    -Dartifact="org.keycloak:keycloak-quarkus-dist:$keycloak_version:tar.gz" \
    -DoutputDirectory="$work" >&2
  tar -xzf "$work/keycloak-quarkus-dist-$keycloak_version.tar.gz" -C "$work"
  rm -rf "$out" && mv "$work/keycloak-$keycloak_version" "$out"
}

# promtool (`check rules`, `test rules`) and scrapecheck (Prometheus's scrape parsers, see
# hack/promtool/scrapecheck) for the monitoring tests, from the Prometheus Go module.
build_promtool() {
  local out="$cache/promtool-$prometheus_version"
  if [[ -x $out/promtool && -x $out/scrapecheck ]]; then
    log "promtool $prometheus_version cached in $out"
    return
  fi
  log "building promtool and scrapecheck $prometheus_version (cold: 16 min on a busy 2-core machine, modules downloaded)"
  mkdir -p "$out.partial"
  (
    cd "$here/promtool"
    go build -ldflags "-s -w" -o "$out.partial/promtool" github.com/prometheus/prometheus/cmd/promtool
    go build -ldflags "-s -w" -o "$out.partial/scrapecheck" ./scrapecheck
  )
  rm -rf "$out" && mv "$out.partial" "$out"
}

# @camunda8/sdk with its dependencies, exactly as examples/clients/js/package-lock.json pins
# them (npm ci), for the JS recipes (node finds them through NODE_PATH).
fetch_js_sdk() {
  local out="$cache/camunda8-sdk-$js_sdk_version"
  if [[ -f $out/node_modules/@camunda8/sdk/package.json ]]; then
    log "@camunda8/sdk $js_sdk_version cached in $out"
    return
  fi
  [[ -n $js_sdk_version ]] || { log "no pinned @camunda8/sdk version in $clients/js/package.json"; return 1; }
  log "fetching @camunda8/sdk $js_sdk_version from npm"
  local work
  new_scratch_next_to "$out"
  cp "$clients/js/package.json" "$clients/js/package-lock.json" "$work/"
  (cd "$work" && npm ci --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
  rm -rf "$out" && mv "$work" "$out"
}

# io.camunda:camunda-client-java and its runtime dependencies, as jars in one folder (the
# recipes are compiled with javac against it).
fetch_java_client() {
  local out="$cache/camunda-client-java-$java_client_version"
  if [[ -f $out/lib/camunda-client-java-$java_client_version.jar ]]; then
    log "camunda-client-java $java_client_version cached in $out"
    return
  fi
  [[ -n $java_client_version ]] || { log "no pinned camunda-client-java version in $clients/java/pom.xml"; return 1; }
  log "fetching camunda-client-java $java_client_version from Maven Central"
  local work
  new_scratch_next_to "$out"
  mvn -q -B -f "$clients/java/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$work/lib" >&2
  rm -rf "$out" && mv "$work" "$out"
}

# Keycloak 26 wants Java 21 or newer; the machine's default JDK may be older.
keycloak_java() {
  local candidate
  for candidate in "${TLO_KEYCLOAK_JAVA:-}" /usr/lib/jvm/temurin-25-jdk-amd64/bin/java \
    /usr/lib/jvm/*-21-*/bin/java /usr/lib/jvm/temurin-2*/bin/java "$(command -v java || true)"; do
    [[ -n $candidate && -x $candidate ]] || continue
    local major
    major=$("$candidate" -XshowSettings:properties -version 2>&1 | sed -n 's/^\s*java.specification.version = \([0-9]*\).*/\1/p')
    if [[ -n $major && $major -ge 21 ]]; then
      echo "$candidate"
      return
    fi
  done
  log "no Java 21+ found; install one (apt-get install openjdk-21-jre-headless? not in Debian 12) or set TLO_KEYCLOAK_JAVA"
  return 1
}

only=${1:-all}
case $only in
  all)
    with_lock control-plane build_control_plane
    with_lock node build_node
    with_lock node-runtime install_node_runtime
    with_lock helm build_helm
    with_lock keycloak fetch_keycloak
    with_lock promtool build_promtool
    with_lock camunda8-sdk fetch_js_sdk
    with_lock camunda-client-java fetch_java_client
    with_lock image-tools install_image_tools
    with_lock cargo-deny build_cargo_tool cargo-deny "$cargo_deny_version"
    with_lock cargo-cyclonedx build_cargo_tool cargo-cyclonedx "$cargo_cyclonedx_version"
    ;;
  # What `make demo` needs: no node.
  demo)
    with_lock control-plane build_control_plane
    with_lock helm build_helm
    with_lock keycloak fetch_keycloak
    ;;
  control-plane) with_lock control-plane build_control_plane ;;
  node) with_lock node build_node; with_lock node-runtime install_node_runtime ;;
  helm) with_lock helm build_helm ;;
  keycloak) with_lock keycloak fetch_keycloak ;;
  promtool) with_lock promtool build_promtool ;;
  clients) with_lock camunda8-sdk fetch_js_sdk; with_lock camunda-client-java fetch_java_client ;;
  # What `make image` needs.
  image)
    with_lock image-tools install_image_tools
    with_lock cargo-cyclonedx build_cargo_tool cargo-cyclonedx "$cargo_cyclonedx_version"
    ;;
  cargo-deny) with_lock cargo-deny build_cargo_tool cargo-deny "$cargo_deny_version" ;;
  *) echo "usage: hack/tools.sh [all|demo|control-plane|node|helm|keycloak|promtool|image|cargo-deny|clients]" >&2; exit 2 ;;
esac

k8s="$cache/kubernetes-$kubernetes_version"
echo "export TLO_KUBE_APISERVER=$k8s/kube-apiserver"
echo "export TLO_KUBE_CONTROLLER_MANAGER=$k8s/kube-controller-manager"
echo "export TLO_ETCD=$k8s/etcd"
node="$cache/node-$kubernetes_version"
echo "export TLO_KUBELET=$node/kubelet"
echo "export TLO_KUBE_PROXY=$node/kube-proxy"
echo "export TLO_KUBE_SCHEDULER=$node/kube-scheduler"
echo "export TLO_KUBECTL=$node/kubectl"
echo "export TLO_CONTAINERD=$(command -v containerd || true)"
echo "export TLO_RUNC=$(command -v runc || true)"
echo "export TLO_CTR=$(command -v ctr || true)"
echo "export TLO_CNI_BIN_DIR=/usr/lib/cni"
echo "export TLO_HELM=$cache/helm-$helm_version/helm"
echo "export TLO_KEYCLOAK_HOME=$cache/keycloak-$keycloak_version"
echo "export TLO_KEYCLOAK_JAVA=$(keycloak_java)"
echo "export TLO_PROMTOOL=$cache/promtool-$prometheus_version/promtool"
echo "export TLO_SCRAPECHECK=$cache/promtool-$prometheus_version/scrapecheck"
echo "export TLO_CAMUNDA_JS_SDK=$cache/camunda8-sdk-$js_sdk_version/node_modules"
echo "export TLO_CAMUNDA_JAVA_CLIENT=$cache/camunda-client-java-$java_client_version/lib"
echo "export TLO_NODE=$(command -v node || true)"
echo "export TLO_JAVA=$(command -v java || true)"
echo "export TLO_JAVAC=$(command -v javac || true)"
echo "export TLO_BUILDAH=$(command -v buildah || true)"
echo "export TLO_SKOPEO=$(command -v skopeo || true)"
echo "export TLO_REGISTRY=$(command -v docker-registry || true)"
echo "export TLO_HTPASSWD=$(command -v htpasswd || true)"
echo "export TLO_CARGO_DENY=$cache/cargo-deny-$cargo_deny_version/bin/cargo-deny"
echo "export TLO_CARGO_CYCLONEDX=$cache/cargo-cyclonedx-$cargo_cyclonedx_version/bin/cargo-cyclonedx"
