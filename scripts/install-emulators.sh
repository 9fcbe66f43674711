#!/usr/bin/env bash
# Installs the object-storage emulators the e2e tests start (tests/e2e/emulators.rs), idempotently,
# into ${HYBROKER_EMULATORS:-$HOME/.cache/hybroker/emulators}:
#   moto/     a Python venv with moto's server      (bin/moto_server: S3, and EC2 for the capacity tests)
#   azurite/  Azurite's Blob service from npm        (node_modules/.bin/azurite-blob)
#   kubernetes-validate/  a Python venv with kubernetes-validate (the Kubernetes API schemas, offline),
#             which checks deploy/kubernetes (tests/e2e/manifests.rs)
#   schemathesis/  a Python venv with schemathesis   (bin/st: the gateway against its OpenAPI
#             document; its bin/python has jsonschema-rs and PyYAML for deploy/schema/job.schema.json)
# and promtool (Debian's `prometheus` package), which checks deploy/prometheus (tests/e2e/deploy.rs).
# A tool already installed at the pinned version is skipped. Prints one line per tool with the time
# it took. Needs python3 with venv and node with npm; as root with apt-get, installs them if missing.
set -euo pipefail

MOTO_VERSION=5.2.5
KUBERNETES_VALIDATE_VERSION=1.37.0
AZURITE_VERSION=3.35.0
SCHEMATHESIS_VERSION=4.32.5
DIR=${HYBROKER_EMULATORS:-$HOME/.cache/hybroker/emulators}
mkdir -p "$DIR"

need() { command -v "$1" >/dev/null 2>&1; }
apt_updated=
apt_install() {
  if need apt-get && [[ $(id -u) == 0 ]]; then
    [[ -n $apt_updated ]] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "please install: $*" >&2; exit 1
  fi
}
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

# A Python tool in its own venv under $DIR/NAME: kept when CHECK (a function) says it is ready at
# its pinned version, else made afresh with `pip install SPEC` and checked again.
venv_tool() {
  local name=$1 spec=$2 check=$3 start
  start=$(now)
  if "$check"; then
    echo "$spec: already installed in $DIR/$name ($(took "$start"))"
    return
  fi
  need python3 || apt_install python3 python3-venv python3-pip
  # Debian's python3 lacks venv/ensurepip until python3-venv is installed.
  python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv python3-pip
  rm -rf "${DIR:?}/$name"
  python3 -m venv "$DIR/$name"
  "$DIR/$name/bin/pip" install -q --disable-pip-version-check "$spec"
  "$check" || { echo "$spec in $DIR/$name does not run" >&2; exit 1; }
  echo "$spec: installed in $DIR/$name ($(took "$start"))"
}

# moto: ready when its venv imports the pinned version and the server script runs.
moto_ok() {
  [[ -x $DIR/moto/bin/moto_server ]] &&
    [[ $("$DIR/moto/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null) == "$MOTO_VERSION" ]] &&
    "$DIR/moto/bin/moto_server" --help >/dev/null 2>&1
}
venv_tool moto "moto[server]==$MOTO_VERSION" moto_ok

# Azurite: ready when azurite-blob reports the pinned version.
azurite_ok() {
  [[ -x $DIR/azurite/node_modules/.bin/azurite-blob ]] &&
    [[ $("$DIR/azurite/node_modules/.bin/azurite-blob" --version 2>/dev/null) == "$AZURITE_VERSION" ]]
}
start=$(now)
if azurite_ok; then
  echo "azurite $AZURITE_VERSION: already installed in $DIR/azurite ($(took "$start"))"
else
  { need node && need npm; } || apt_install nodejs npm
  rm -rf "$DIR/azurite"
  mkdir -p "$DIR/azurite"
  npm install --prefix "$DIR/azurite" --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" >/dev/null
  azurite_ok || { echo "azurite install in $DIR/azurite does not run" >&2; exit 1; }
  echo "azurite $AZURITE_VERSION: installed in $DIR/azurite ($(took "$start"))"
fi

# kubernetes-validate: ready when its venv reports the pinned version.
kubernetes_validate_ok() {
  [[ -x $DIR/kubernetes-validate/bin/kubernetes-validate ]] &&
    [[ $("$DIR/kubernetes-validate/bin/kubernetes-validate" --version 2>/dev/null) == *"$KUBERNETES_VALIDATE_VERSION"* ]]
}
venv_tool kubernetes-validate "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" kubernetes_validate_ok

# schemathesis: ready when its venv reports the pinned version and imports the schema validator.
schemathesis_ok() {
  [[ -x $DIR/schemathesis/bin/st ]] &&
    [[ $("$DIR/schemathesis/bin/st" --version 2>/dev/null) == "st, version $SCHEMATHESIS_VERSION" ]] &&
    "$DIR/schemathesis/bin/python" -c 'import jsonschema_rs, yaml' 2>/dev/null
}
venv_tool schemathesis "schemathesis==$SCHEMATHESIS_VERSION" schemathesis_ok

# promtool: from Debian's prometheus package. Its own Prometheus service (and node exporter) must not
# keep running: they would hold ports 9090/9100 on a test machine.
start=$(now)
if need promtool; then
  echo "promtool: already installed ($(promtool --version 2>&1 | head -n1)) ($(took "$start"))"
else
  apt_install --no-install-recommends prometheus
  for svc in prometheus prometheus-node-exporter; do
    if need systemctl && systemctl is-active --quiet "$svc" 2>/dev/null; then
      systemctl disable --now "$svc" >/dev/null 2>&1 || true
    elif need service; then
      service "$svc" stop >/dev/null 2>&1 || true
    fi
  done
  need promtool || { echo "promtool is still missing after installing prometheus" >&2; exit 1; }
  echo "promtool: installed ($(promtool --version 2>&1 | head -n1)) ($(took "$start"))"
fi
