#!/usr/bin/env bash
# The whole test suite. Installs what the tests need on a fresh Debian machine (as root):
# Mosquitto and its clients (tests start their own broker on an ephemeral loopback port),
# Chromium (the dashboard is checked in a real headless browser), libfaketime (tests/clock.rs
# steps the daemon's wall clock with it), Node.js with the aedes broker from npm (a second,
# independent MQTT broker: tests/other_broker.rs) and Python's paho-mqtt (a second,
# independent MQTT client for the interoperability test), pysparkplug (Sparkplug B payloads
# for tests/sparkplug.rs), python3-fusepy (tests/faultfs.py, a
# FUSE file system that fails writes with EIO/ENOSPC/EROFS on demand: tests/disk_faults.rs),
# nats-server and PostgreSQL (the central side's engine and database: tests/central_nats.rs,
# tests/central_load.rs start their own on ephemeral loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
[ -x /usr/bin/chromium ] || need+=(chromium)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || need+=(faketime)
{ command -v node && command -v npm; } >/dev/null || need+=(nodejs npm)
/usr/bin/python3 -c 'import fusepy' 2>/dev/null || need+=(python3-fusepy)
command -v nats-server >/dev/null || need+=(nats-server)
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v lintian >/dev/null || need+=(lintian)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "test.sh: please install: ${need[*]} (sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "test.sh: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# A second MQTT broker implementation (aedes, npm; pinned in tests/node/package-lock.json).
if [ ! -d tests/node/node_modules/aedes ]; then
  echo "test.sh: installing aedes (npm)"
  npm ci --prefix tests/node --silent --no-audit --no-fund
fi
if ! python3 -c 'import paho.mqtt' 2>/dev/null; then
  echo "test.sh: installing paho-mqtt (PyPI)"
  python3 -m pip install -q --disable-pip-version-check paho-mqtt
fi
# A Sparkplug B implementation edgeferry did not write, encoding the payloads of
# tests/sparkplug.rs (it pins paho-mqtt below 2, whose publish API the tests also use).
if ! python3 -c 'import pysparkplug' 2>/dev/null; then
  echo "test.sh: installing pysparkplug (PyPI)"
  python3 -m pip install -q --disable-pip-version-check pysparkplug==0.6.1
fi

# Free disk where target/ is: a full disk kills the linker with SIGBUS (docs/DECISIONS.md).
free_disk() { df -h --output=avail . | tail -1 | tr -d ' '; }
echo "test.sh: free disk before the build: $(free_disk)"
cargo test --all-targets
cargo test --doc
# The gateway-only build (no central receiver, no embedded broker): it must build, pass its
# lints and its unit tests on its own (the integration tests need `edgeferry collect`).
echo "test.sh: the gateway-only build (--no-default-features)"
cargo clippy --no-default-features --lib --bins -- -D warnings
cargo test --no-default-features --lib
# The Debian package: built with cargo-deb (crates.io, pinned), then checked by
# tests/packaging.rs (control fields, contents, conffiles, unpacked into a throwaway root with
# dpkg, its postinst run against stand-ins for systemd's helpers).
echo "test.sh: the Debian package (cargo deb)"
if ! cargo deb --version >/dev/null 2>&1; then
  echo "test.sh: installing cargo-deb (crates.io)"
  cargo install cargo-deb --locked --version 3.8.0 --quiet
fi
rm -rf target/debian-test
cargo deb --output target/debian-test/
echo "test.sh: target/ is $(du -sh target | cut -f1), free disk $(free_disk)"
EDGEFERRY_TEST_DEB="$(ls target/debian-test/edgeferry_*.deb)" cargo test --test packaging debian_package
