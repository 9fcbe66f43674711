#!/usr/bin/env bash
# Prepares a machine image for hybroker's capacity providers: run it on a fresh GPU VM (Ubuntu 22.04
# or 24.04 with the NVIDIA driver, e.g. the AWS Deep Learning Base AMI or an Azure NC/ND image), or
# as a Packer shell provisioner, then snapshot the VM into an AMI / Azure image and name it in
# [site.capacity.aws] image_id or [site.capacity.azure] image.
#
#   sudo ./build-image.sh /path/to/hybroker          # the release binary (cargo build --release)
#
# It installs the binary and the systemd unit (deploy/systemd/hybroker-agent.service), and nothing
# else: no credentials, no join token (each launch brings its own in its user data), no instance
# profile needed. Idempotent.
set -euo pipefail
binary=${1:?usage: build-image.sh PATH_TO_HYBROKER_BINARY}
here=$(cd "$(dirname "$0")" && pwd)
[[ $(id -u) == 0 ]] || { echo "run as root (sudo)" >&2; exit 1; }
"$binary" --version >/dev/null || { echo "$binary does not run here" >&2; exit 1; }

install -m 0755 "$binary" /usr/local/bin/hybroker
# The one agent unit, shared with on-prem nodes (deploy/systemd/; the release archive has both).
install -m 0644 "$here/../systemd/hybroker-agent.service" /etc/systemd/system/hybroker-agent.service
install -d -m 0755 /etc/hybroker
install -d -m 0711 /var/lib/hybroker
install -d -m 0700 /var/lib/hybroker/tls
# The sandbox: loop-mounted work dirs, unshare/setpriv (util-linux), ext4 tools.
if command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq util-linux e2fsprogs cloud-init >/dev/null
fi
systemctl daemon-reload
# Not enabled here: cloud-init starts it once the launch's files are written.
systemctl disable hybroker-agent.service >/dev/null 2>&1 || true
# Leave no identity in the image: a snapshot must not carry a node's key or certificate.
rm -f /var/lib/hybroker/tls/* /etc/hybroker/join.toml /etc/hybroker/agent.toml
cloud-init clean --logs >/dev/null 2>&1 || true
echo "image ready: $(/usr/local/bin/hybroker --version); snapshot this machine now"
