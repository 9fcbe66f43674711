#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine, then runs formatting,
# lint and every test. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
  if need apt-get && [[ $(id -u) == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "please install: $*" >&2; exit 1
  fi
}

# Toolchain: rustup's cargo with rustfmt and clippy; gcc builds SQLite and ring.
need cargo || { echo "cargo not found: install Rust 1.95 with rustup" >&2; exit 1; }
need cc || apt_install gcc libc6-dev
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy
# The sandbox tests (run as root, as CI does) use loop-mounted ext4 images, unshare and setpriv.
need mkfs.ext4 || apt_install e2fsprogs
{ need unshare && need setpriv && need losetup; } || apt_install util-linux mount
# The container image tests (tests/e2e/image.rs) build with buildah and run with podman on runc
# (crun 1.8 refuses these machines' hybrid cgroups); the image takes the host's CA bundle.
{ need podman && need buildah && need runc && [[ -f /etc/ssl/certs/ca-certificates.crt ]]; } ||
  apt_install podman buildah runc ca-certificates
# The packaging tests (tests/e2e/ship.rs): systemd-analyze verifies the units, groff checks the man
# pages, man resolves the units' Documentation= pages.
need systemd-analyze || apt_install systemd
{ need groff && need man; } || apt_install groff-base man-db
# The product test runs the quickstart's printed commands as printed, curl among them.
need curl || apt_install curl
# cargo-deny checks licenses, banned crates (a second crypto provider) and sources.
cargo deny --version >/dev/null 2>&1 || cargo install --locked cargo-deny --version 0.20.2
# No system protoc is needed (a vendored one builds the gRPC code); the tests start the real
# binary's services on loopback, and object-storage emulators (moto for S3, Azurite for Azure Blob)
# installed here once and found by tests/e2e/emulators.rs through HYBROKER_EMULATORS.
export HYBROKER_EMULATORS=${HYBROKER_EMULATORS:-$HOME/.cache/hybroker/emulators}
bash scripts/install-emulators.sh

export CARGO_TERM_COLOR=never
export CARGO_INCREMENTAL=0
export CARGO_PROFILE_DEV_DEBUG=line-tables-only

echo "== rustfmt"
cargo fmt --all -- --check
echo "== cargo deny (bans, licenses, sources; the advisory database cannot be fetched here)"
cargo deny check bans licenses sources
echo "== clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== tests"
cargo test --locked --all-targets
