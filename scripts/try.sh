#!/usr/bin/env bash
# Try edgeferry in one command: a throwaway Mosquitto on a loopback port, edgeferry with its real
# journal in a temp dir, simulated sensors publishing over MQTT (plus one bad payload), then
# `edgeferry status` and a count of what reached the journal. Installs Mosquitto when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-10}

if ! { [ -x /usr/sbin/mosquitto ] && command -v mosquitto_pub >/dev/null; }; then
  [ "$(id -u)" = 0 ] || { echo "please install mosquitto and mosquitto-clients" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi
cargo build --release -q
BIN=target/release/edgeferry
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

cat > "$work/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
persistence true
persistence_location $work/
max_queued_messages 0
max_inflight_messages 1000
$( [ "$(id -u)" = 0 ] && echo "user root" )
CONF
/usr/sbin/mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 & pids+=($!)
sleep 0.5

sed -e "s#^data_dir = .*#data_dir = \"$work/data\"#" \
    -e "s#^url = \"mqtt://127.0.0.1:1883\"#url = \"mqtt://127.0.0.1:$port\"#" \
    -e "s#^listen = .*#listen = \"127.0.0.1:0\"#" \
    -e '/^\[upstream\]/,/^topic/d' \
    config.toml.example > "$work/config.toml"
echo "== config: $work/config.toml (check-config output below)"
$BIN check-config -c "$work/config.toml" | head -3
$BIN run -c "$work/config.toml" 2> "$work/edgeferry.log" & gw=$!; pids+=($gw)
for _ in $(seq 100); do grep -q "ready:" "$work/edgeferry.log" && break; sleep 0.1; done
grep -E "journal open|ready:|admin listening" "$work/edgeferry.log" | sed 's/^/   /'

echo "== publishing simulated sensors for ${SECONDS_TO_RUN}s (3 sites x 4 devices, 10 Hz total)"
sent=0
end=$((SECONDS + SECONDS_TO_RUN))
while [ $SECONDS -lt $end ]; do
  for site in north south east; do
    for dev in 1 2 3 4; do
      t=$(awk -v s=$RANDOM 'BEGIN{srand(s); printf "%.2f", 20+5*rand()}')
      mosquitto_pub -p "$port" -q 1 -t "sensors/$site/dev$dev/temperature" \
        -m "{\"value\": $t, \"ts\": $(date +%s%3N)}"
      sent=$((sent+1))
    done
  done
  sleep 0.2
done
mosquitto_pub -p "$port" -q 1 -t sensors/north/dev1/temperature -m '{"value": "hot"}'
sleep 0.5
echo "== edgeferry status"
$BIN status -c "$work/config.toml" || true
kill -TERM "$gw"; wait "$gw" || true
count=$($BIN dump-journal -c "$work/config.toml" | wc -l)
echo "== published $sent good readings (+1 bad); journal holds $count readings: $( [ "$count" = "$sent" ] && echo MATCH || echo MISMATCH )"
echo "   logs: $work/edgeferry.log"
