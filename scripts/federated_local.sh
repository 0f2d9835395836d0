#!/usr/bin/env bash
# `umit federated` in deployment mode on one machine: a Flower SuperLink and one SuperNode per
# site, each a separate process, every API bound to 127.0.0.1 (nothing listens on another
# interface), then `flwr run` of the umit Flower App (scripts/umit-federated) with FED.yaml.
#
# usage: scripts/federated_local.sh FED.yaml WORK NAME=PREP[:KEY=VALUE] [NAME=PREP[:KEY=VALUE] ...]
#
#   FED.yaml   the umit federated settings (task, rounds, local_steps, strategy, min_sites, the
#              pretrain/finetune section, out = the server's run folder)
#   WORK       folder for Flower's home, the logs, the process ids and each site's local state
#   NAME=PREP  one site: its name and PREP folder; ":KEY=VALUE" keeps only the cases whose catalog
#              attribute KEY is VALUE (e.g. site_a=/data/prep:site=site_a)
#
# Environment: UMIT_FLWR_PORT (SuperLink port, default 39100; SuperNode i listens on port+10+i),
# FLWR_RUN_ARGS (extra `flwr run` arguments). umit[federated] must be importable (installed, or
# PYTHONPATH=src); Flower installs nothing at run time (--disable-runtime-dependency-installation).
# The processes this script started are stopped when it exits; their ids are in WORK/*.pid.
set -euo pipefail

if [ $# -lt 3 ]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
FED=$(realpath "$1")
WORK=$(realpath -m "$2")
shift 2
PORT=${UMIT_FLWR_PORT:-39100}
HERE=$(cd "$(dirname "$0")" && pwd)
SUPERLINK_BIN=$(command -v flower-superlink) || {
    echo "flower-superlink not found: pip install 'umit[federated]'" >&2
    exit 2
}
# SuperLink and SuperNodes start flower-superexec / flwr-* helpers found on PATH
export PATH="$(dirname "$(realpath "$SUPERLINK_BIN")"):$PATH"
export FLWR_HOME="$WORK/flwr"
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "umit-local"

[superlink.umit-local]
address = "127.0.0.1:$PORT"
insecure = true
EOF

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_port() { # wait until 127.0.0.1:$1 accepts connections
    python - "$1" <<'EOF'
import socket, sys, time
port, deadline = int(sys.argv[1]), time.time() + 60
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit(f"nothing listens on 127.0.0.1:{port} after 60 s")
EOF
}

flower-superlink --insecure --host 127.0.0.1 --port "$PORT" \
    --disable-runtime-dependency-installation >"$WORK/superlink.log" 2>&1 &
PIDS+=($!)
echo $! >"$WORK/superlink.pid"
wait_port "$PORT"

i=0
for site in "$@"; do
    i=$((i + 1))
    name=${site%%=*}
    rest=${site#*=}
    prep=${rest%%:*}
    config="prep='$(realpath "$prep")' work='$WORK/site-$name' site='$name'"
    if [ "$rest" != "$prep" ]; then
        kv=${rest#*:}
        config="$config site-key='${kv%%=*}' site-value='${kv#*=}'"
    fi
    flower-supernode --insecure --superlink "127.0.0.1:$PORT" \
        --host 127.0.0.1 --port $((PORT + 10 + i)) \
        --node-config "$config" >"$WORK/supernode-$name.log" 2>&1 &
    PIDS+=($!)
    echo $! >"$WORK/supernode-$name.pid"
    wait_port $((PORT + 10 + i))
done

cd "$HERE/umit-federated"
# shellcheck disable=SC2086
flwr run . umit-local --run-config "umit-config='$FED'" --stream ${FLWR_RUN_ARGS:-} \
    2>&1 | tee "$WORK/run.log"
