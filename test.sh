#!/usr/bin/env bash
# The README's test command: sets up what the tests need on this machine, then runs them all.
#   ./test.sh            install what is absent, start pcscd, run every test (any extra arguments
#                        go to `cargo test`, e.g. ./test.sh --test system_e2e)
#   ./test.sh setup      only the set-up (CI runs it before clippy, which builds the PC/SC feature)
# What it installs when absent (Debian packages, apt-get as root): Mosquitto (tests run the
# gateway against it with the shipped ACL), nats-server (a three-node cluster with JetStream and
# MQTT: tests/nats_cluster.rs), libfaketime (a validator with its clock a day ahead),
# SoftHSM2 (PKCS#11 tests), PostgreSQL (the ledger's second backend), pcsc-lite's headers, pcscd and vsmartcard's virtual reader (PC/SC
# tests), Prometheus's promtool and python3-venv (the operator-tools test), and from PyPI Frictionless
# into target/tools/py (the TIDES export's check), chromium and chromium-driver (the pages'
# browser tests). The tests start their own brokers, servers and
# tokens on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")"

# Packages are installed as root (sudo when not root and sudo exists).
SUDO=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=(sudo); fi

need_apt=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then need_apt+=(mosquitto); fi
if ! command -v mosquitto_passwd >/dev/null 2>&1; then need_apt+=(mosquitto); fi
# tests/nats_cluster.rs starts a throwaway three-node NATS cluster (JetStream, MQTT listeners).
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then need_apt+=(nats-server); fi
# tests/system_e2e.rs runs one validator with its clock a day ahead (libfaketime).
if ! command -v faketime >/dev/null 2>&1; then need_apt+=(faketime); fi
# The PKCS#11 HSM tests run against SoftHSM2 tokens they create in temporary directories.
if ! command -v softhsm2-util >/dev/null 2>&1; then need_apt+=(softhsm2); fi
# PC/SC (feature tapgate/pcsc, tests/pcsc_e2e.rs): pcsc-lite's headers and pkg-config file to link
# libpcsclite, pcscd, and vsmartcard's virtual reader driver (vpcd).
if ! pkg-config --exists libpcsclite 2>/dev/null; then need_apt+=(libpcsclite-dev pkgconf); fi
if ! command -v pcscd >/dev/null 2>&1 && [ ! -x /usr/sbin/pcscd ]; then need_apt+=(pcscd); fi
if ! dpkg -s vsmartcard-vpcd >/dev/null 2>&1; then need_apt+=(vsmartcard-vpcd); fi
# The PostgreSQL ledger's tests start throwaway clusters (initdb, postgres, pg_ctl) as the postgres user.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then need_apt+=(postgresql); fi
# docs/operations.md's commands, which tests/operations_doc.rs runs, call the HTTP APIs with curl.
if ! command -v curl >/dev/null 2>&1; then need_apt+=(curl); fi
# tests/operator_tools.rs checks deploy/prometheus/alerts.yml with promtool (Debian's prometheus)
# and validates the TIDES export with Frictionless, from PyPI into a virtual environment under
# target/ (python3-venv brings the venv module's pip).
if ! command -v promtool >/dev/null 2>&1; then need_apt+=(prometheus); fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then need_apt+=(python3-venv); fi
# tests/pages.rs drives Debian's chromium headless through chromedriver (WebDriver).
if ! command -v chromium >/dev/null 2>&1; then need_apt+=(chromium); fi
if ! command -v chromedriver >/dev/null 2>&1; then need_apt+=(chromium-driver); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# Frictionless for tests/operator_tools.rs (it looks in target/tools/py first).
FRICTIONLESS_VERSION=5.21.0
if ! target/tools/py/bin/frictionless --version 2>/dev/null | grep -qx "$FRICTIONLESS_VERSION"; then
  echo "== installing frictionless $FRICTIONLESS_VERSION into target/tools/py"
  python3 -m venv target/tools/py
  target/tools/py/bin/pip install -q "frictionless==$FRICTIONLESS_VERSION"
fi

# pcscd with vpcd's first reader slot ("Virtual PCD 00 00" on port 35963). No systemd here: start
# it (it daemonises) unless one runs; the PC/SC test fails with a clear message without it.
if [ ! -f /etc/reader.conf.d/vpcd ]; then
  mkdir -p /etc/reader.conf.d
  printf '%s\n' 'FRIENDLYNAME "Virtual PCD"' 'DEVICENAME   /dev/null:0x8C7B' \
    'LIBPATH      /usr/lib/pcsc/drivers/serial/libifdvpcd.so' 'CHANNELID    0x8C7B' > /etc/reader.conf.d/vpcd
fi
if ! { [ -f /run/pcscd/pcscd.pid ] && kill -0 "$(tr -dc '0-9' < /run/pcscd/pcscd.pid)" 2>/dev/null; }; then
  echo "== starting pcscd"
  "$(command -v pcscd || echo /usr/sbin/pcscd)"
fi
vpcd_listening() {
  [ -S /run/pcscd/pcscd.comm ] && grep -q ':8C7B 00000000:0000 0A' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
for _ in $(seq 50); do vpcd_listening && break; sleep 0.2; done
# A pcscd left by an earlier run can lose vpcd's listener: restart it once.
if ! vpcd_listening; then
  echo "== restarting pcscd (vpcd is not listening on 35963)"
  if [ -f /run/pcscd/pcscd.pid ]; then kill "$(tr -dc '0-9' < /run/pcscd/pcscd.pid)" 2>/dev/null || true; fi
  sleep 1
  "$(command -v pcscd || echo /usr/sbin/pcscd)"
  for _ in $(seq 50); do vpcd_listening && break; sleep 0.2; done
fi


if [ "${1:-}" = "setup" ]; then exit 0; fi
cargo test --workspace --features tapgate/pcsc "$@"
