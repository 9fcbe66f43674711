#!/usr/bin/env bash
# Builds the release archives: hybroker-<version>-<arch>-linux.tar.gz in dist/ (or --out DIR), each
# holding
#   hybroker-<version>-<arch>-linux/
#     bin/hybroker                       a static binary (glibc, +crt-static), stripped
#     config/                            the commented example configs (copy to /etc/hybroker/)
#     deploy/systemd/                    the units and the sysusers.d snippet
#     deploy/image/                      the cloud image script (it installs the agent unit)
#     share/bash-completion/completions/hybroker, share/zsh/site-functions/_hybroker,
#     share/fish/vendor_completions.d/hybroker.fish
#     share/man/man1/hybroker*.1         one page per command
#     README.md, LICENSE (when the repository has one), SHA256SUMS (of all the above)
# and dist/SHA256SUMS over the archives. Both checksum files are `sha256sum -c` format.
#
#   scripts/release.sh                   build x86_64 (and aarch64 when rustup has the target)
#   scripts/release.sh --binary PATH     package an already-built x86_64 binary, no build
#   scripts/release.sh --binary PATH --allow-dynamic
#                                        … even a dynamic one (tests check the layout with a debug
#                                        build; never for a release)
#   scripts/release.sh --out DIR         write the archives to DIR instead of dist/
#
# The static binary is built with `--target x86_64-unknown-linux-gnu` so that
# `-C target-feature=+crt-static` applies to the binary only; build scripts and proc macros stay
# dynamic host programs. The script refuses a binary that is not static (ldd) or does not run.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
binary=
allow_dynamic=
out=dist
while (($#)); do
  case $1 in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --allow-dynamic) allow_dynamic=1; shift ;;
    -h | --help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
[[ -n $version ]] || { echo "no version in Cargo.toml" >&2; exit 1; }
# Reproducible archives: file times from the commit (or now outside a checkout). Not exported: the
# cc crate reruns C builds (ring, SQLite) and everything above them when SOURCE_DATE_EPOCH changes.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f s", b - a }'; }

# Which targets: x86_64 always; aarch64 only when its standard library is installed.
declare -A arch_of=([x86_64-unknown-linux-gnu]=x86_64 [aarch64-unknown-linux-gnu]=aarch64)
targets=(x86_64-unknown-linux-gnu)
if [[ -z $binary ]]; then
  if rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
    targets+=(aarch64-unknown-linux-gnu)
  else
    echo "aarch64: skipped (rustup target add aarch64-unknown-linux-gnu, and a gcc-aarch64-linux-gnu linker, to build it)"
  fi
fi

# A static binary: `ldd` calls it "not a dynamic executable" (static) or "statically linked"
# (static-pie), and it has no program interpreter.
is_static() {
  local report
  report=$(ldd "$1" 2>&1 || true)
  [[ $report == *"not a dynamic executable"* || $report == *"statically linked"* ]]
}

build() {
  local target=$1 start
  start=$(now)
  local flags_var="CARGO_TARGET_$(tr 'a-z-' 'A-Z_' <<<"$target")_RUSTFLAGS"
  if [[ $target == aarch64-* ]] && command -v aarch64-linux-gnu-gcc >/dev/null; then
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  fi
  # Only the target's rustflags (not RUSTFLAGS): build scripts are built for the host, dynamic.
  env "$flags_var=-C target-feature=+crt-static" \
    cargo build --release --locked --target "$target" >&2
  echo "built $target in $(took "$start")" >&2
  echo "target/$target/release/hybroker"
}

# The completions and man pages come from the host's binary (the first one, x86_64), the same
# command line on every architecture.
generated=$(mktemp -d)
trap 'rm -rf "$generated"' EXIT

package() {
  local target=$1 bin=$2 arch=${arch_of[$1]}
  local name="hybroker-$version-$arch-linux"
  local stage="$generated/$name"
  if ! is_static "$bin"; then
    [[ -n $allow_dynamic ]] || { echo "$bin is not a static binary: $(ldd "$bin" 2>&1 | head -n3)" >&2; exit 1; }
    echo "warning: $bin is not static (--allow-dynamic): this archive is for tests, not for release" >&2
  fi
  rm -rf "$stage"
  install -d "$stage/bin" "$stage/config" "$stage/deploy/systemd" "$stage/share/man/man1" \
    "$stage/share/bash-completion/completions" "$stage/share/zsh/site-functions" \
    "$stage/share/fish/vendor_completions.d"
  install -m 0755 "$bin" "$stage/bin/hybroker"
  strip "$stage/bin/hybroker" 2>/dev/null || true
  if [[ $arch == x86_64 ]]; then
    "$stage/bin/hybroker" --version >/dev/null || { echo "$bin does not run" >&2; exit 1; }
    "$stage/bin/hybroker" completions bash >"$generated/hybroker.bash"
    "$stage/bin/hybroker" completions zsh >"$generated/_hybroker"
    "$stage/bin/hybroker" completions fish >"$generated/hybroker.fish"
    mkdir -p "$generated/man1"
    "$stage/bin/hybroker" manpages "$generated/man1" >/dev/null
  fi
  install -m 0644 "$generated/hybroker.bash" "$stage/share/bash-completion/completions/hybroker"
  install -m 0644 "$generated/_hybroker" "$stage/share/zsh/site-functions/_hybroker"
  install -m 0644 "$generated/hybroker.fish" "$stage/share/fish/vendor_completions.d/hybroker.fish"
  install -m 0644 "$generated"/man1/*.1 "$stage/share/man/man1/"
  cp -R config/. "$stage/config/"
  install -m 0644 deploy/systemd/* "$stage/deploy/systemd/"
  install -d "$stage/deploy/image"
  install -m 0755 deploy/image/build-image.sh "$stage/deploy/image/"
  install -m 0644 deploy/image/cloud-init.yaml "$stage/deploy/image/"
  install -m 0644 README.md "$stage/"
  for license in LICENSE LICENSE-APACHE LICENSE-MIT; do
    [[ -f $license ]] && install -m 0644 "$license" "$stage/"
  done
  (cd "$stage" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum >SHA256SUMS)
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
    -C "$generated" -cf - "$name" | gzip -n >"$out/$name.tar.gz"
  echo "$out/$name.tar.gz ($(du -h "$out/$name.tar.gz" | cut -f1); binary $(du -h "$stage/bin/hybroker" | cut -f1))"
}

for target in "${targets[@]}"; do
  if [[ -n $binary ]]; then
    bin=$binary
  else
    bin=$(build "$target")
  fi
  package "$target" "$bin"
done
(cd "$out" && find . -maxdepth 1 -name "hybroker-$version-*-linux.tar.gz" -printf '%P\n' | LC_ALL=C sort |
  xargs -d '\n' sha256sum >SHA256SUMS)
echo "$out/SHA256SUMS"
