#!/usr/bin/env bash
# GPU node smoke test, for operators bringing up a new GPU node. Needs only an already built
# `hybroker` binary (no Rust toolchain): it starts a broker and an agent with real NVML (no
# simulation), runs a job that does a bf16 matmul with PyTorch (nvidia-smi when PyTorch is absent)
# through them, and prints the agent's inventory and the job's result. Finishes in under 5 minutes.
#
#   scripts/gpu-smoke.sh [path/to/hybroker]      (default: ./hybroker, then target/release, target/debug)
set -euo pipefail

bin=${1:-}
if [[ -z $bin ]]; then
  for candidate in ./hybroker target/release/hybroker target/debug/hybroker; do
    if [[ -x $candidate ]]; then bin=$candidate; break; fi
  done
fi
[[ -n $bin && -x $bin ]] || { echo "gpu-smoke: no hybroker binary found; pass its path" >&2; exit 2; }
bin=$(realpath "$bin")

work=$(mktemp -d /tmp/hybroker-gpu-smoke.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
deadline=$((SECONDS + 280))
cd "$work"

echo "== hybroker gpu smoke test ($("$bin" --version)) on $(hostname) in $work"
"$bin" pki init --dir pki --trust-domain smoke.hybroker.local >/dev/null
"$bin" pki issue --dir pki --role broker --name broker --dns localhost --ip 127.0.0.1 >/dev/null
"$bin" pki issue --dir pki --role agent --site smoke --name "$(hostname -s | tr -c 'A-Za-z0-9._\n-' '-')" >/dev/null
"$bin" pki issue --dir pki --role admin --name admin >/dev/null
node=$(hostname -s | tr -c 'A-Za-z0-9._\n-' '-')

cat > broker.toml <<EOF
[broker]
listen = "127.0.0.1:0"
[tls]
ca_cert = "pki/ca.pem"
cert = "pki/broker.pem"
key = "pki/broker-key.pem"
[store]
path = "broker.db"
[leases]
ttl = "20s"
heartbeat_interval = "2s"
EOF
"$bin" broker --config broker.toml --addr-file broker.addr 2>broker.log &
pids+=($!)
until [[ -s broker.addr ]]; do
  (( SECONDS < deadline )) || { echo "broker did not start"; cat broker.log; exit 1; }
  sleep 0.1
done
addr=$(cat broker.addr)

cat > agent.toml <<EOF
[agent]
broker_url = "https://$addr"
work_dir = "work"
[tls]
ca_cert = "pki/ca.pem"
cert = "pki/$node.pem"
key = "pki/$node-key.pem"
EOF
"$bin" agent --config agent.toml 2>agent.log &
pids+=($!)

admin=("$bin" admin --broker "https://$addr" --ca-cert pki/ca.pem --cert pki/admin.pem --key pki/admin-key.pem)
until "${admin[@]}" agents 2>/dev/null | grep -q '^connected: *yes'; do
  (( SECONDS < deadline )) || { echo "agent did not register"; cat agent.log; exit 1; }
  sleep 0.2
done
echo
echo "== agent inventory (NVML)"
"${admin[@]}" agents
gpus=$("${admin[@]}" agents | grep -c '  gpu ' || true)
if (( gpus == 0 )); then
  echo "no GPU found through NVML: is the NVIDIA driver installed? (agent log follows)"
  cat agent.log
  exit 1
fi

cat > matmul.py <<'EOF'
import os, time
import torch
assert torch.cuda.is_available(), "CUDA not available to the job"
dev = torch.device("cuda")
print(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')} device={torch.cuda.get_device_name(0)}")
n = 8192
a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
iters = 50
t0 = time.perf_counter()
for _ in range(iters):
    c = a @ b
torch.cuda.synchronize()
dt = time.perf_counter() - t0
print(f"bf16 matmul {n}x{n}: {2 * n**3 * iters / dt / 1e12:.1f} TFLOP/s, checksum {c.float().abs().mean().item():.3f}")
EOF
if python3 -c 'import torch' 2>/dev/null; then
  # Inline: the job's sandbox has its own /tmp, where this script's files are not.
  cmd=$(python3 -c 'import json, sys; print(json.dumps(["python3", "-c", open(sys.argv[1]).read()]))' matmul.py)
else
  echo "(PyTorch not found: the job runs nvidia-smi instead)"
  cmd='["nvidia-smi", "--query-gpu=name,uuid,memory.total,temperature.gpu", "--format=csv"]'
fi
cat > job.yaml <<EOF
name: gpu-smoke
command: $cmd
resources:
  gpus: 1
  cpus: 1
  memory_gib: 4
max_runtime: 3m
max_attempts: 1
EOF
echo
echo "== job"
status=0
"${admin[@]}" submit job.yaml --wait || status=$?
echo
echo "== job output"
"${admin[@]}" logs "$("${admin[@]}" list --limit 1 | awk 'NR==2 {print $1}')"

# The device gate: a job without GPUs must not open any GPU's node, even the first one.
cat > nogpu.yaml <<'EOF'
name: gpu-smoke-no-gpu
command: [sh, -c, 'if (exec 3<>/dev/nvidia0) 2>/dev/null; then echo "opened /dev/nvidia0 without a GPU"; exit 1; fi; echo "/dev/nvidia0 refused to a gpus: 0 job"']
resources:
  gpus: 0
max_runtime: 1m
max_attempts: 1
EOF
echo
echo "== a gpus: 0 job cannot open /dev/nvidia0"
"${admin[@]}" submit nogpu.yaml --wait || { echo "a gpus: 0 job opened /dev/nvidia0"; status=1; }
"${admin[@]}" logs "$("${admin[@]}" list --limit 1 | awk 'NR==2 {print $1}')"
echo
if (( status == 0 )); then echo "gpu smoke test PASSED in ${SECONDS}s"; else echo "gpu smoke test FAILED"; tail -20 agent.log; fi
exit $status
