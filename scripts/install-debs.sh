#!/bin/sh
# Install the Debian packages the tests and benchmarks need, if missing:
# swaks (a real SMTP client), sqlite3 (the backup test), postfix (for
# smtp-sink and smtp-source; the system Postfix is left unconfigured and is
# never started by this), systemd (systemd-analyze, systemd-sysusers and
# systemd-tmpfiles check the shipped units; only the tools are used, no
# service is started), chattr (e2fsprogs) and postgresql (initdb, pg_ctl and
# psql: the tests run throwaway servers of their own; no default cluster is
# created and no PostgreSQL service is left running or enabled) and haproxy
# (checks config/haproxy.cfg with `haproxy -c`; the tests start their own
# haproxy processes; no haproxy service is left running or enabled), opendkim
# (the bench's postfix-dkim peer runs its own OpenDKIM; no opendkim service is
# left running or enabled) and, when `node` is missing, nodejs and npm (for
# scripts/install-haraka.sh: Haraka 3.3 needs Node.js >= 20, Debian bookworm's
# is 18, so there that script says what to do). The tests
# fail, not skip, when one of these is missing (tests/tools.py). Quiet and
# idempotent: with everything present it prints nothing and changes nothing.
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
      { echo "install-debs: could not fetch promtool (Debian package prometheus)" >&2; exit 1; }
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
      { echo "install-debs: could not fetch fail2ban (Debian package fail2ban)" >&2; exit 1; }
fi
need=""
command -v swaks >/dev/null 2>&1 || need="$need swaks"
{ [ -x /usr/sbin/smtp-sink ] && [ -x /usr/sbin/smtp-source ] && \
  [ -f /usr/share/postfix/main.cf.dist ]; } || need="$need postfix"  # bench/postfix.py needs main.cf.dist
command -v sqlite3 >/dev/null 2>&1 || need="$need sqlite3"  # the backup script of docs/OPERATIONS.md
for tool in systemd-analyze systemd-sysusers systemd-tmpfiles; do
    command -v $tool >/dev/null 2>&1 || { need="$need systemd"; break; }
done
command -v chattr >/dev/null 2>&1 || [ -x /usr/sbin/chattr ] || [ -x /sbin/chattr ] || \
    need="$need e2fsprogs"  # tests/test_holes_startup.py: an immutable spool file
command -v script >/dev/null 2>&1 || need="$need bsdutils"  # bench/postfix.py runs postfix under script(1)
pg=""  # tests/pgserver.py: the server programs, found where Debian puts them
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { need="$need postgresql"; pg=1; }
hap=""  # tests/test_cluster_docs.py: haproxy -c on config/haproxy.cfg
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || { need="$need haproxy"; hap=1; }
dkim=""  # bench/opendkim.py: the postfix-dkim peer's signing milter
[ -x /usr/sbin/opendkim ] || { need="$need opendkim"; dkim=1; }
# scripts/install-haraka.sh (the bench's Haraka peer); a NodeSource nodejs brings its own npm
command -v node >/dev/null 2>&1 || need="$need nodejs npm"
[ -z "$need" ] && exit 0
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install-debs: need root to install:$need" >&2; exit 1; fi
fi
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
if [ -n "$pg" ]; then
    # postgresql-common's postinst creates and starts a default cluster (15/main)
    # unless create_main_cluster is off; its createcluster.conf reads this directory.
    $SUDO mkdir -p /etc/postgresql-common/createcluster.d
    printf '%s\n' "# scripts/install-debs.sh of relayd: the tests run their own servers" \
        "create_main_cluster = off" | \
        $SUDO tee /etc/postgresql-common/createcluster.d/relayd-tests.conf >/dev/null
fi
log=$(mktemp)
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        --no-install-recommends $need; } >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"
    echo "install-debs: could not install:$need" >&2; exit 1
fi
rm -f "$log"
if [ -n "$pg" ]; then
    # No server was installed before this: stop whatever the install started
    # (a cluster left by an earlier, unpurged install) and keep it from starting at boot.
    pg_lsclusters -h 2>/dev/null | while read -r version cluster _port status _rest; do
        [ "$status" != online ] || $SUDO pg_ctlcluster "$version" "$cluster" stop || true
    done
    if [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true
    fi
fi
if [ -n "$hap" ]; then
    # Debian's postinst starts the haproxy service (an empty default configuration):
    # stop it and keep it from starting at boot; the tests run haproxy themselves.
    if [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now haproxy >/dev/null 2>&1 || true
    else
        $SUDO invoke-rc.d haproxy stop >/dev/null 2>&1 || \
            $SUDO /etc/init.d/haproxy stop >/dev/null 2>&1 || true
        $SUDO update-rc.d haproxy disable >/dev/null 2>&1 || true
    fi
fi
if [ -n "$dkim" ]; then
    # Debian's postinst starts and enables the opendkim service (its /etc/opendkim.conf):
    # stop it and keep it from starting at boot; the bench runs OpenDKIM itself.
    if [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now opendkim >/dev/null 2>&1 || true
    else
        $SUDO invoke-rc.d opendkim stop >/dev/null 2>&1 || \
            $SUDO /etc/init.d/opendkim stop >/dev/null 2>&1 || true
        $SUDO update-rc.d opendkim disable >/dev/null 2>&1 || true
    fi
fi
