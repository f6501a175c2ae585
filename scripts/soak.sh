#!/usr/bin/env bash
# The long soak: tests/soak.rs for MINUTES minutes (default 30) on the release build. Real
# Mosquitto, a real gateway (alert rules, upstream) and a real `edgeferry collect`; 400
# series at 1 Hz; every 15 s the collector is SIGKILLed, its port then answers 503 for 3 s,
# it comes back, and Mosquitto is stopped for 1.5 s. The gateway's VmRSS, open descriptors
# and data-directory bytes are sampled every MINUTES*6 s (2–10 s) and printed as a table;
# it fails when one of them keeps growing after the first third, or when a reading did not
# reach the collector exactly once. The suite runs the same test for 150 s
# (`cargo test --test soak`). Needs Mosquitto (./scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-30}
case $MINUTES in
  '' | *[!0-9]*) echo "usage: $0 [MINUTES]   (whole minutes, default 30)" >&2; exit 1 ;;
esac
if [ "$MINUTES" -lt 1 ]; then
  echo "soak.sh: at least 1 minute" >&2
  exit 1
fi
if ! { [ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null; }; then
  echo "soak.sh: Mosquitto is missing (./scripts/test.sh installs it, or apt-get install mosquitto)" >&2
  exit 1
fi
echo "soak.sh: ${MINUTES} min soak on the release build (started $(date -u +%FT%TZ))"
EDGEFERRY_SOAK_SECS=$((MINUTES * 60)) \
  cargo test --release --test soak -- --nocapture --test-threads 1
