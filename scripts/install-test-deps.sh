#!/usr/bin/env bash
# Install the real POP3 clients, Postfix, Dovecot and PostgreSQL that tests/realclients.py and
# tests/test_realclients_dovecot.py drive, and the chromium that tests/test_web.py drives
# through Playwright (which cannot download a browser of its own here).  Idempotent; run as root on Debian 12.
#
# - Fast re-runs: when every binary is already present, apt is not touched at all.
# - Postfix is preseeded to "Local only" so its postinst does not prompt.
# - No system Postfix or Dovecot is left running: a temporary policy-rc.d stops the
#   packages from starting their daemons during the install (Dovecot's default config
#   would listen on every interface, port 110/995), and anything running afterwards is
#   stopped.  The tests start private instances on 127.0.0.0/8 addresses only.
#
# INSTALL_TEST_DEPS_FORCE=1 runs apt even when everything is present.
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

BINARIES=(curl fetchmail mpop getmail postfix postconf dovecot chromium faketime cc)
# python3-venv: tests/test_service_user.py installs popguard with Debian's own Python,
# where the unprivileged service user may run it (not under /root).
# faketime (and libfaketime with it): tests/test_netns.py steps one host's wall clock;
# gcc and libc6-dev build the small shim that libfaketime 0.9.10 needs there
# (popguard.testing.clock_step).
PACKAGES=(curl fetchmail mpop getmail6 postfix dovecot-core dovecot-pop3d ca-certificates
    postgresql chromium python3-venv faketime gcc libc6-dev)

missing=()
for bin in "${BINARIES[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
# The PostgreSQL server's tools are not on PATH (Debian keeps them per version).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=("postgresql")
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=("ca-certificates")
/usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=("python3-venv")
[ -e /usr/include/dlfcn.h ] || missing+=("libc6-dev")

if [ "${#missing[@]}" -eq 0 ] && [ -z "${INSTALL_TEST_DEPS_FORCE:-}" ]; then
    echo "install-test-deps: all present (${BINARIES[*]})"
    exit 0
fi
echo "install-test-deps: missing: ${missing[*]:-(none, forced)}"

if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# Preseed Postfix: no prompt, and a configuration that listens on loopback only.
debconf-set-selections <<'SEL'
postfix postfix/main_mailer_type select Local only
postfix postfix/mailname string localhost
postfix postfix/destinations string localhost
postfix postfix/protocols select ipv4
SEL

# Keep maintainer scripts from starting daemons during this install (exit 101 =
# "action forbidden", see /usr/share/doc/init-system-helpers/README.policy-rc.d).
POLICY=/usr/sbin/policy-rc.d
own_policy=""
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    own_policy=1
fi
cleanup() {
    if [ -n "$own_policy" ]; then rm -f "$POLICY"; fi
}
trap cleanup EXIT

apt-get update
apt-get install -y --no-install-recommends "${PACKAGES[@]}"

cleanup
own_policy=""

# Safety net: stop a system Postfix/Dovecot should one be running anyway.
stop_service() {
    local name=$1
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl stop "$name" >/dev/null 2>&1 || true
    elif command -v service >/dev/null 2>&1; then
        service "$name" stop >/dev/null 2>&1 || true
    fi
}
stop_service postfix
stop_service dovecot
stop_service postgresql
if postfix status >/dev/null 2>&1; then
    postfix stop || true
fi
# Should the system Postfix ever be started later, it listens on loopback only.
if [ "$(postconf -h inet_interfaces 2>/dev/null || true)" != "loopback-only" ]; then
    postconf -e 'inet_interfaces = loopback-only' || true
fi

for bin in "${BINARIES[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || { echo "install-test-deps: $bin still missing" >&2; exit 1; }
done
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
    || { echo "install-test-deps: postgresql still missing" >&2; exit 1; }
echo "install-test-deps: done"
