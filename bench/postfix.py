"""Peer: Postfix configured as an equivalent relay, in its own directories.

Everything lives under one temp dir: ``conf/`` (main.cf derived from
/usr/share/postfix/main.cf.dist, master.cf written here), ``queue/`` (same disk as
relayd's spool), ``data/``, ``maillog``.  It listens on 127.0.0.1:PORT only,
relays everything from 127.0.0.0/8 (or SASL-authenticated) to
``relayhost = [127.0.0.1]:SINKPORT``, does no local delivery, no TLS, and keeps
Postfix's defaults otherwise (in_flow_delay, destination concurrency 20,
connection cache).  SASL AUTH goes to bench/dovecot_auth_stub.py.  With ``milter``
(the postfix-dkim peer: bench/opendkim.py) every message, from smtpd and from
pickup, passes that milter, and a milter that fails makes Postfix answer 4xx
(``milter_default_action = tempfail``): no message goes out unsigned.

``postfix -c DIR start|stop`` run under ``script -qc`` so that fatal errors,
which Postfix prints only to a terminal, are captured.  The system Postfix
(/etc/postfix) is never touched.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import procstat
from bench.util import free_port, stop_process, wait_smtp_ready

POSTFIX = "/usr/sbin/postfix"
MAIN_CF_DIST = "/usr/share/postfix/main.cf.dist"
_PROBLEM = re.compile(r"postfix-bench/([a-z-]+)\[\d+\]: ((?:fatal|panic|error|warning): .*)")
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


def available() -> bool:
    return (os.path.exists(POSTFIX) and os.path.exists(MAIN_CF_DIST)
            and shutil.which("script") is not None)


def _derive_main_cf(dist: str, overrides: dict[str, str]) -> str:
    """main.cf.dist with every overridden parameter (and its continuation lines) removed,
    then the overrides appended."""
    out: list[str] = []
    skipping = False
    for line in dist.splitlines():
        if line[:1] in (" ", "\t") and line.strip():
            if not skipping:
                out.append(line)
            continue
        m = re.match(r"^([A-Za-z0-9_]+)\s*=", line)
        skipping = bool(m and m.group(1) in overrides)
        if not skipping:
            out.append(line)
    out.append("")
    out.append("# ---- relayd bench overrides ----")
    out.extend(f"{k} = {v}" for k, v in overrides.items())
    return "\n".join(out) + "\n"


class Postfix:
    def __init__(self, base: Path, sink_port: int, port: int | None = None, maxproc: int = 1100,
                 sasl_user: str = "bench", sasl_password: str = "bench-secret",  # noqa: S107
                 milter: str | None = None):
        self.base = Path(base)
        self.conf = self.base / "conf"
        self.queue = self.base / "queue"
        self.data = self.base / "data"
        self.maillog = self.base / "maillog"
        self.auth_sock = self.base / "auth.sock"
        self.port = port or free_port()
        self.sink_port = sink_port
        self.maxproc = maxproc
        self.sasl_user, self.sasl_password = sasl_user, sasl_password
        self.milter = milter
        self.auth_proc: subprocess.Popen[bytes] | None = None
        self.master_pid: int | None = None

    # -- config ---------------------------------------------------------------
    def write_config(self) -> None:
        for d in (self.conf, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)  # noqa: S103 - the postfix user must traverse it
        pw = pwd.getpwnam("postfix")
        os.chown(self.data, pw.pw_uid, pw.pw_gid)
        overrides = {
            "compatibility_level": "3.7",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "command_directory": "/usr/sbin",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "meta_directory": "/etc/postfix",
            "shlib_directory": "/usr/lib/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": "postfix-bench",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.base),
            "myhostname": "postfix.bench.local",
            "mydomain": "bench.local",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "mynetworks": "127.0.0.0/8",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "smtpd_relay_restrictions":
                "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": str(self.auth_sock),
            "smtpd_client_connection_count_limit": "0",
            "message_size_limit": str(64 * 1024 * 1024),
            "mailbox_size_limit": "0",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "sendmail_path": "/usr/sbin/sendmail",
            "newaliases_path": "/usr/bin/newaliases",
            "mailq_path": "/usr/bin/mailq",
            "html_directory": "no",
            "manpage_directory": "/usr/share/man",
            "sample_directory": "/usr/share/doc/postfix",
            "readme_directory": "no",
        }
        if self.milter:
            overrides.update({"smtpd_milters": self.milter, "non_smtpd_milters": self.milter,
                              "milter_default_action": "tempfail"})
        with open(MAIN_CF_DIST) as f:
            (self.conf / "main.cf").write_text(_derive_main_cf(f.read(), overrides))
        # master.cf: the services a relay needs, nothing chrooted, smtpd on our port only
        mp = self.maxproc
        services = [
            f"127.0.0.1:{self.port} inet n - n - {mp} smtpd",
            "pickup    unix  n       -       n       60      1       pickup",
            "cleanup   unix  n       -       n       -       0       cleanup",
            "qmgr      unix  n       -       n       300     1       qmgr",
            "rewrite   unix  -       -       n       -       -       trivial-rewrite",
            "bounce    unix  -       -       n       -       0       bounce",
            "defer     unix  -       -       n       -       0       bounce",
            "trace     unix  -       -       n       -       0       bounce",
            "verify    unix  -       -       n       -       1       verify",
            "flush     unix  n       -       n       1000?   0       flush",
            "proxymap  unix  -       -       n       -       -       proxymap",
            "proxywrite unix -       -       n       -       1       proxymap",
            "smtp      unix  -       -       n       -       -       smtp",
            "relay     unix  -       -       n       -       -       smtp",
            "showq     unix  n       -       n       -       -       showq",
            "error     unix  -       -       n       -       -       error",
            "retry     unix  -       -       n       -       -       error",
            "discard   unix  -       -       n       -       -       discard",
            "anvil     unix  -       -       n       -       1       anvil",
            "scache    unix  -       -       n       -       1       scache",
            "postlog   unix-dgram n  -       n       -       1       postlogd",
        ]
        (self.conf / "master.cf").write_text("\n".join(services) + "\n")

    # -- lifecycle -------------------------------------------------------------
    def _postfix(self, *args: str, timeout: float = 60) -> tuple[int, str]:
        cmd = " ".join(shlex.quote(a) for a in (POSTFIX, "-c", str(self.conf), *args))
        p = subprocess.run(["script", "-qec", cmd, "/dev/null"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        return p.returncode, p.stdout.decode("utf-8", "replace").replace("\r", "")

    def start(self) -> Postfix:
        self.write_config()
        self.auth_proc = subprocess.Popen(
            [sys.executable, "-m", "bench.dovecot_auth_stub", "--socket", str(self.auth_sock),
             "--user", self.sasl_user, "--password", self.sasl_password],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent))
        deadline = time.monotonic() + 10
        while not self.auth_sock.exists():
            if self.auth_proc.poll() is not None or time.monotonic() > deadline:
                err = self.auth_proc.stderr.read().decode() if self.auth_proc.stderr else ""
                raise RuntimeError(f"dovecot auth stub did not start: {err}")
            time.sleep(0.05)
        rc, out = self._postfix("start")
        self.start_output = out
        if rc != 0:
            self.stop()
            raise RuntimeError(f"postfix start failed (rc={rc}):\n{out}\n{self.log_tail()}")
        pidfile = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 15
        while self.master_pid is None:
            try:
                self.master_pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"no master.pid:\n{out}\n{self.log_tail()}") from None
                time.sleep(0.1)
        try:
            wait_smtp_ready("127.0.0.1", self.port, timeout=20)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"postfix not answering: {e}\n{out}\n{self.log_tail()}") from e
        return self

    def roots(self) -> list[int]:
        r = []
        if self.master_pid:
            r.append(self.master_pid)
        if self.auth_proc is not None and self.auth_proc.poll() is None:
            r.append(self.auth_proc.pid)
        return r

    def queued(self) -> int:
        n = 0
        for q in QUEUES:
            for _root, _dirs, files in os.walk(self.queue / q):
                n += len(files)
        return n

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no maillog)"

    def log_problems(self, limit: int = 4) -> list[str]:
        """Distinct warning/error lines of the maillog (timestamps and pids dropped);
        qmgr's multi-line congestion advice is reduced to its first line."""
        try:
            text = self.maillog.read_text(errors="replace")
        except OSError:
            return []
        seen: dict[str, int] = {}
        for ln in text.splitlines():
            m = _PROBLEM.search(ln)
            if m is None:
                continue
            msg = re.sub(r"\[127\.0\.0\.1\]:\d+", "[127.0.0.1]:SINK", m.group(2))
            if re.match(r"warning: (you may need|so that|please avoid|lots of|to turn off)", msg):
                continue
            key = f"{m.group(1)}: {msg}"
            seen[key] = seen.get(key, 0) + 1
        out = [k + (f" (x{n})" if n > 1 else "") for k, n in seen.items()]
        return out[:limit] + ([f"... {len(out) - limit} more kinds"] if len(out) > limit else [])

    def stop(self) -> None:
        if self.master_pid is not None:
            try:
                self._postfix("stop", timeout=30)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and procstat.tree_pids([self.master_pid]):
                time.sleep(0.1)
            left = procstat.tree_pids([self.master_pid])
            if left:
                try:
                    self._postfix("abort", timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                time.sleep(0.5)
                for pid in procstat.tree_pids([self.master_pid]):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.master_pid = None
        stop_process(self.auth_proc, timeout=5)

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
