#!/bin/sh
# Install the Debian packages the tests and benchmarks need, if missing:
# swaks (a real SMTP client), sqlite3 (the backup test) and postfix (for
# smtp-sink and smtp-source; the
# system Postfix is left unconfigured and is never started by this).
set -e
# promtool (checks the alert rules) comes from Debian's prometheus package, unpacked
# into .cache without installing it, so no Prometheus service is ever set up.
PROMTOOL_DIR=.cache/prometheus
if [ ! -x "$PROMTOOL_DIR/usr/bin/promtool" ]; then
    mkdir -p .cache
    ( cd .cache && rm -f prometheus_*.deb && \
      { apt-get download prometheus >/dev/null 2>&1 || \
        { ${SUDO_CMD:-} apt-get update -qq && apt-get download prometheus >/dev/null; }; } && \
      dpkg -x prometheus_*.deb prometheus && rm -f prometheus_*.deb ) || \
      echo "install-debs: could not fetch promtool; the alert-rule checks will not run" >&2
fi
# fail2ban-regex (checks config/fail2ban against real relayd log lines) likewise
# comes from Debian's fail2ban package unpacked into .cache: installing it would
# start a banning service on this machine. It is pure Python (tests run it with
# PYTHONPATH=.cache/fail2ban/usr/lib/python3/dist-packages).
F2B_DIR=.cache/fail2ban
if ! command -v fail2ban-regex >/dev/null 2>&1 && [ ! -f "$F2B_DIR/usr/bin/fail2ban-regex" ]; then
    mkdir -p .cache
    ( cd .cache && rm -f fail2ban_*.deb && \
      { apt-get download fail2ban >/dev/null 2>&1 || \
        { ${SUDO_CMD:-} apt-get update -qq && apt-get download fail2ban >/dev/null; }; } && \
      dpkg -x fail2ban_*.deb fail2ban && rm -f fail2ban_*.deb ) || \
      echo "install-debs: could not fetch fail2ban; the fail2ban filter checks will not run" >&2
fi
need=""
command -v swaks >/dev/null 2>&1 || need="$need swaks"
[ -x /usr/sbin/smtp-sink ] || need="$need postfix"
command -v sqlite3 >/dev/null 2>&1 || need="$need sqlite3"  # the backup script of docs/OPERATIONS.md
[ -z "$need" ] && exit 0
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install-debs: need root to install:$need" >&2; exit 1; fi
fi
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
