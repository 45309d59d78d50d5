"""Configuration: every setting of relayd as frozen msgspec Structs.

Owns: the shape, defaults (with their units in the names) and validation of
``relayd.toml``, and the command-line overrides that the daemon accepts.
Unknown keys are errors that name the key (``forbid_unknown_fields``); a bad
value is an error that names the key and says what is wrong.

Also owns where the file is found (:func:`locate`: ``--config``, else
``$RELAYD_CONFIG``, else the system file ``/etc/relayd/relayd.toml`` when it
exists, else the built-in defaults, whose spool is ``./var``) and the
documented default file itself, shipped as package data
(``relayd/data/relayd.toml``, the same file as config/relayd.toml) so that
``relayd --print-default-config`` works from an installed wheel.

Also owns the ``[cluster]`` section and the secrets it points to
(:func:`cluster_secrets`: the PostgreSQL password from a file or a variable of
the environment mapping it is given, and the key that encrypts DKIM private
keys at rest), the node's name (:func:`node_name`) and :func:`redact_dsn`.
Neither secret ever appears in an error message or a repr.

Untrusted input: the TOML file (operator-written, but typos must be caught).
Settings read: all of them. No other module reads files or the environment:
the composition root (relayd.app) reads the variables, asks :func:`locate`,
loads a ``Config`` here and passes parts of it down.

See also: config/relayd.toml (the documented default file), relayd.app.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
#: Outbound TLS security levels (relayd.delivery.tlslevels says what each means).
TlsLevelName = Literal["none", "may", "encrypt", "verify"]


#: The configuration file of an installed relayd (``relayd install-service`` puts it there).
SYSTEM_CONFIG = "/etc/relayd/relayd.toml"


#: Settings that no longer exist ("section.key": why). A file that still sets one
#: keeps loading; relayd logs ``setting_ignored`` naming it at start.
REMOVED_SETTINGS: dict[str, str] = {
    "dkim.signing_process": "DKIM is always signed in the signing child",
}


class ConfigError(Exception):
    """A configuration file or override that cannot be used; the text names the key."""


def parse_hostport(value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[v6]:PORT``) into its parts; raise ValueError if malformed."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError(f"bad address {value!r}: missing ']'")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {value!r}")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host, port_text = value, ""
    if not host:
        raise ValueError(f"bad address {value!r}: missing host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"bad address {value!r}: expected HOST:PORT")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad address {value!r}: port must be 0-65535")
    return host, int(port_text)


def _check_hostport(key: str, value: str, default_port: int | None = None) -> None:
    try:
        parse_hostport(value, default_port=default_port)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _check_networks(values: tuple[str, ...], key: str = "plaintext_auth_networks") -> None:
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError as exc:
            raise ValueError(f"{key}: bad network {v!r}: {exc}") from None


class _Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Process-wide settings."""

    hostname: str = "localhost"
    data_dir: str = "./var"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # journald "<N>" priority prefix on each line (relayd.observe.logs): auto = when
    # stdout is the journal stream ($JOURNAL_STREAM names its device:inode).
    log_priority_prefix: Literal["auto", "always", "never"] = "auto"
    # smtp_rejected / auth_failed lines per (reason, client address): a burst, then
    # a trickle; a ceiling for all addresses together (relayd.observe.logbudget).
    log_rejections_burst: PositiveInt = 20
    log_rejections_per_minute: NonNegativeInt = 6
    log_rejections_max_per_second: PositiveInt = 100
    log_rejections_summary_seconds: Seconds = 60.0
    shutdown_grace_seconds: Seconds = 30.0


class SmtpConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The SMTP submission listeners and session limits."""

    listen: str = "127.0.0.1:2525"
    tls_listen: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    plaintext_auth_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_message_size_bytes: PositiveInt = 26_214_400
    max_recipients: PositiveInt = 1000
    idle_timeout_seconds: Seconds = 300.0
    max_connections: PositiveInt = 2000
    max_connections_per_ip: PositiveInt = 200
    # Silence before the 220: input that arrives first gets 554 5.5.0 (early talker).
    # 0 = no pause (input already there when the 220 is due is still refused).
    greet_pause_seconds: Annotated[float, msgspec.Meta(ge=0, le=30)] = 0.0
    max_commands_per_session: PositiveInt = 100_000
    min_data_rate_bytes_per_second: NonNegativeInt = 1024
    min_data_rate_grace_seconds: Seconds = 30.0  # DATA may be slower than that this long
    auth_failures_before_delay: NonNegativeInt = 3
    auth_failures_before_disconnect: PositiveInt = 10
    auth_failure_delay_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.5  # doubles each time
    auth_failure_max_delay_seconds: Annotated[float, msgspec.Meta(ge=0)] = 8.0
    auth_lockout_seconds: Seconds = 900.0  # a locked username/address, and failure memory
    auth_max_usernames_per_address: PositiveInt = 50  # distinct failing usernames: address locked
    auth_throttle_exempt_networks: tuple[str, ...] = ()  # never locked as a whole address
    smtputf8: bool = True
    allow_address_literals: bool = False  # RCPT TO:<user@[192.0.2.1]> (else 550 5.7.1)

    def __post_init__(self) -> None:
        _check_hostport("listen", self.listen)
        if self.tls_listen:
            _check_hostport("tls_listen", self.tls_listen)
            if not (self.tls_cert_file and self.tls_key_file):
                raise ValueError("tls_listen needs tls_cert_file and tls_key_file")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        _check_networks(self.plaintext_auth_networks)
        _check_networks(self.auth_throttle_exempt_networks, "auth_throttle_exempt_networks")


class CredentialsConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """argon2id parameters for new hashes (verification reads them from the hash)."""

    argon2_time_cost: PositiveInt = 3
    argon2_memory_cost_kib: Annotated[int, msgspec.Meta(ge=8)] = 65536
    argon2_parallelism: PositiveInt = 4
    hash_threads: PositiveInt = 2


class ShapingDestination(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One row of the shaping table: a destination and its limits (None: the default row's)."""

    name: str
    domains: tuple[str, ...] = ()
    mx_suffixes: tuple[str, ...] = ()
    connections: NonNegativeInt | None = None
    messages_per_connection: NonNegativeInt | None = None
    messages_per_second: Annotated[float, msgspec.Meta(ge=0)] | None = None
    messages_per_minute: NonNegativeInt | None = None

    def __post_init__(self) -> None:
        if not self.name or not (self.domains or self.mx_suffixes):
            raise ValueError("shaping.destination: a name and domains or mx_suffixes are needed")


class ShapingConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Per-destination shaping in MX mode: the default row, the table, the back-off."""

    connections: NonNegativeInt = 0
    messages_per_connection: NonNegativeInt = 0
    messages_per_second: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    messages_per_minute: NonNegativeInt = 0
    backoff_initial_seconds: Seconds = 60.0
    backoff_max_seconds: Seconds = 3600.0
    destination: tuple[ShapingDestination, ...] = ()

    def __post_init__(self) -> None:
        names = [d.name for d in self.destination]
        if len(set(names)) != len(names):
            raise ValueError("shaping.destination: names must be unique")


class DeliveryConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where and how accepted mail goes next."""

    mode: Literal["smarthost", "mx"] = "smarthost"
    smarthost: str = "127.0.0.1:2526"
    smarthost_tls: Literal["none", "starttls", "tls"] = "none"
    smarthost_username: str = ""
    smarthost_password: str = ""
    # The smarthost only: verify its certificate and name (smarthost_tls starttls/tls).
    # MX hosts follow tls_level / tls_policy (relayd.delivery.tlslevels).
    tls_verify: bool = True
    # Outbound TLS security level towards MX hosts (Postfix's smtp_tls_security_level):
    # none | may | encrypt | verify; per recipient domain in [delivery.tls_policy].
    tls_level: TlsLevelName = "may"
    tls_policy: dict[str, TlsLevelName] = msgspec.field(default_factory=dict)
    tls_ca_file: str = ""  # PEM trust store for level verify ("" = the system's)
    # MX mode: DANE (RFC 7672) through the validating resolvers of dns_nameservers (checked
    # at start-up: without one, or without the AD bit, a warning and DANE skipped).
    dane: Literal["off", "on"] = "off"
    connections_per_host: PositiveInt = 20
    agent_processes: PositiveInt = 1  # outbound SMTP runs in this many child processes
    messages_per_connection: PositiveInt = 1000
    idle_connection_seconds: Seconds = 30.0
    connect_timeout_seconds: Seconds = 15.0
    command_timeout_seconds: Seconds = 60.0
    retry_first_seconds: Seconds = 300.0
    retry_max_seconds: Seconds = 4000.0
    retry_jitter: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2
    max_queue_lifetime_seconds: Seconds = 432_000.0
    bounces: bool = True
    # Days a recipient that failed permanently as not existing stays suppressed for its
    # sending domain (0: no suppression list).
    suppression_days: Annotated[float, msgspec.Meta(ge=0, le=36_500)] = 30.0
    helo_name: str = ""
    dns_nameservers: tuple[str, ...] = ()
    mx_port: Port = 25  # the SMTP port of MX hosts (tests point it at a sink)
    # MX mode connects to global addresses only; these open private ones (RFC 1918,
    # 100.64/10, fc00::/7) or listed networks (loopback, link-local, private, reserved).
    mx_allow_private: bool = False
    mx_allowed_networks: tuple[str, ...] = ()
    # MX mode: MTA-STS (RFC 8461) policies applied, TLSRPT (RFC 8460) daily reports written
    # (relayd.delivery.sts, tlsrpt); mta_sts_port is a test/lab setting (policy host's port).
    mta_sts: bool = True
    mta_sts_port: Port = 443
    mta_sts_timeout_seconds: Seconds = 10.0
    tlsrpt: bool = True
    tlsrpt_dir: str = ""  # "" = <data_dir>/tlsrpt
    tlsrpt_contact: str = ""  # the reports' contact-info ("" = postmaster@<hostname>)
    routes: dict[str, str] = msgspec.field(default_factory=dict)
    shaping: ShapingConfig = msgspec.field(default_factory=ShapingConfig)

    def __post_init__(self) -> None:
        _check_hostport("smarthost", self.smarthost, 25)
        for net in self.mx_allowed_networks:
            try:
                ipaddress.ip_network(net)
            except ValueError as exc:
                raise ValueError(f"mx_allowed_networks: bad network {net!r}: {exc}") from None
        for domain in self.tls_policy:
            if domain != domain.lower().strip(".") or not domain:
                raise ValueError(f"tls_policy: {domain!r}: write the domain in lower case,"
                                 " without a leading or trailing dot")
        for domain, target in self.routes.items():
            try:
                parse_hostport(target, default_port=25)
            except ValueError as exc:
                raise ValueError(f"routes.{domain}: {exc}") from None


class LimitsConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Workspace limits: plan slots, default sending limits, queue caps, network bindings."""

    max_accounts: PositiveInt = 100
    per_minute: NonNegativeInt = 0
    per_hour: NonNegativeInt = 0
    per_day: NonNegativeInt = 0
    max_queued_per_account: PositiveInt = 100_000
    min_free_disk_bytes: NonNegativeInt = 100 * 1024 * 1024
    # The broadest network an account may be bound to (a prefix length: a
    # smaller number allows broader networks; 0 allows any).
    max_network_prefix_v4: Annotated[int, msgspec.Meta(ge=0, le=32)] = 24
    max_network_prefix_v6: Annotated[int, msgspec.Meta(ge=0, le=128)] = 48


class DkimConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """DKIM signing at acceptance."""

    enabled: bool = True
    algorithm: Literal["rsa", "ed25519"] = "rsa"
    dual_ed25519: bool = False
    # Removed (the signing child always signs): still accepted so that a file
    # written for an older relayd keeps loading; see REMOVED_SETTINGS.
    signing_process: bool | msgspec.UnsetType = msgspec.UNSET


class DnsConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the DNS records shown to the operator look like."""

    cname_target: str = ""


class MetricsConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The Prometheus endpoint."""

    listen: str = "127.0.0.1:9101"

    def __post_init__(self) -> None:
        if self.listen:
            _check_hostport("listen", self.listen)


class ControlConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The control socket."""

    socket: str = ""
    socket_mode: int = 0o660


class SpoolConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Durable storage."""

    delivery_log_retention_days: PositiveInt = 30
    # The delivery log file (relayd-log.sqlite3) is kept under this size too: the
    # oldest rows go first.
    delivery_log_max_bytes: PositiveInt = 1024 ** 3
    last_connection_flush_seconds: Seconds = 5.0
    commit_batch_max: PositiveInt = 256
    # The scheduler checks its memory against the database this often (and soon
    # after a failed commit); what it finds is counted (relayd_queue_reconciled_total).
    reconcile_seconds: Seconds = 60.0


class WebhooksConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Delivery events posted to each domain's webhook (``domain set --webhook``)."""

    # Events stored at most in this node's spool; past it the oldest are dropped
    # (relayd_webhook_events_dropped_total).
    max_events: PositiveInt = 100_000
    timeout_seconds: Seconds = 10.0        # one POST, from connect to the answer
    retry_first_seconds: Seconds = 10.0    # after a first failed post; doubles each time
    retry_max_seconds: Seconds = 3600.0    # longest wait between two posts of one event


#: A node's name: what `relayctl node list` shows and `node forget` takes.
NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_DSN_SCHEMES = ("postgresql://", "postgres://")
_QUERY_PASSWORD_RE = re.compile(r"(?i)(?:^|[?&])password=")


def _dsn_userinfo(dsn: str) -> str | None:
    """The ``USER[:PASSWORD]`` part of a URL DSN, or None.

    Taken up to the *last* ``@`` so that a password holding ``@`` or ``/``
    is never mistaken for the host: when in doubt, more is treated as secret.
    """
    rest = dsn.partition("://")[2]
    at = rest.rfind("@")
    return rest[:at] if at >= 0 else None


def _dsn_has_password(dsn: str) -> bool:
    userinfo = _dsn_userinfo(dsn)
    if userinfo is not None and ":" in userinfo:
        return True
    query = dsn.partition("?")[2]
    return bool(_QUERY_PASSWORD_RE.search(query))


class ClusterConfig(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Cluster mode: the PostgreSQL control plane shared by several nodes (not reloadable)."""

    dsn: str = ""            # postgresql://USER@HOST:PORT/DB ; empty = single node on SQLite
    password_file: str = ""  # file whose first line is the PostgreSQL password
    password_env: str = ""   # or: the name of an environment variable holding it
    node_name: str = ""      # this node's name; empty = the host name
    advertise: str = ""      # the address shown in `relayctl node list`; empty = [smtp] listen
    key_file: str = ""       # required with a dsn: 32 random bytes, base64 (one line), that
    #                          encrypt DKIM private keys at rest in the database
    heartbeat_seconds: Seconds = 1.0
    fence_seconds: Seconds = 5.0      # cut off from PostgreSQL this long: stop taking mail
    gone_seconds: Seconds = 10.0      # no heartbeat this long: the others stop waiting for it
    connect_timeout_seconds: Seconds = 5.0

    @property
    def enabled(self) -> bool:
        """Whether this node runs in cluster mode (a DSN is set)."""
        return self.dsn != ""

    def __post_init__(self) -> None:
        # Messages never quote the DSN: it may hold a password.
        if self.dsn:
            if not self.dsn.startswith(_DSN_SCHEMES):
                raise ValueError("cluster.dsn: must be a postgresql:// (or postgres://) URL,"
                                 " postgresql://USER@HOST:PORT/DB; the key=value form is"
                                 " not accepted")
            if _dsn_has_password(self.dsn):
                raise ValueError("cluster.dsn: must not contain a password: put it in"
                                 " cluster.password_file or cluster.password_env")
            if not self.key_file:
                raise ValueError("cluster.key_file: required with cluster.dsn (32 random"
                                 " bytes, base64: head -c 32 /dev/urandom | base64)")
        if self.password_file and self.password_env:
            raise ValueError("cluster.password_file and cluster.password_env:"
                             " set one, not both")
        if self.heartbeat_seconds > self.fence_seconds / 2:
            raise ValueError("cluster.heartbeat_seconds: must be at most half of"
                             " cluster.fence_seconds")
        if self.fence_seconds >= self.gone_seconds:
            raise ValueError("cluster.fence_seconds: must be less than cluster.gone_seconds"
                             " (a node fences itself before the others stop waiting for it)")
        if self.node_name and not NODE_NAME_RE.fullmatch(self.node_name):
            raise ValueError("cluster.node_name: letters, digits, '.', '_' and '-',"
                             " starting with a letter or digit, at most 63 characters")


@dataclass(frozen=True)
class ClusterSecrets:
    """What cluster mode reads from outside the configuration file."""

    password: str | None  # None: no password configured (peer, trust, or ~/.pgpass)
    key: bytes            # 32 bytes: encrypts DKIM private keys at rest

    def __repr__(self) -> str:  # never in a log line or a traceback by accident
        return "ClusterSecrets(password=***, key=***)"


def _read_secret_file(key: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{key}: cannot read {path}: {why}") from None


def _cluster_password(cc: ClusterConfig, environ: Mapping[str, str]) -> str | None:
    if cc.password_file:
        lines = _read_secret_file("cluster.password_file", cc.password_file).splitlines()
        password = lines[0].strip() if lines else ""
        if not password:
            raise ConfigError(f"cluster.password_file: {cc.password_file}: first line is empty")
        return password
    if cc.password_env:
        password = environ.get(cc.password_env, "")
        if not password:
            raise ConfigError(f"cluster.password_env: environment variable"
                              f" {cc.password_env} is unset or empty")
        return password
    return None


def _cluster_key(cc: ClusterConfig) -> bytes:
    if not cc.key_file:
        raise ConfigError("cluster.key_file: required with cluster.dsn")
    text = _read_secret_file("cluster.key_file", cc.key_file).strip()
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"cluster.key_file: {cc.key_file}: not base64"
                          " (expected one line: 32 random bytes, base64)") from None
    if len(key) != 32:
        raise ConfigError(f"cluster.key_file: {cc.key_file}: holds {len(key)} bytes,"
                          " expected 32 (base64 of 32 random bytes)")
    return key


def cluster_secrets(cc: ClusterConfig, environ: Mapping[str, str]) -> ClusterSecrets:
    """Read the PostgreSQL password and the DKIM key-encryption key of cluster mode.

    The password is the first line (stripped) of ``password_file``, or
    ``environ[password_env]``, or None when neither is set; the key is the
    base64 of exactly 32 bytes in ``key_file``. Raise ConfigError naming the
    key for a missing or unreadable file, an unset variable or a bad key; the
    message never holds the password or the key.
    """
    return ClusterSecrets(password=_cluster_password(cc, environ), key=_cluster_key(cc))


def node_name(cc: ClusterConfig, hostname: str) -> str:
    """This node's name: ``cluster.node_name``, else the host name made to fit NODE_NAME_RE."""
    if cc.node_name:
        return cc.node_name
    name = re.sub(r"[^A-Za-z0-9._-]", "-", hostname).lstrip("._-")[:63]
    return name or "node"


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (for logs and messages)."""
    out = dsn
    userinfo = _dsn_userinfo(dsn) if "://" in dsn else None
    if userinfo is not None and ":" in userinfo:
        scheme, _, rest = dsn.partition("://")
        user = userinfo.partition(":")[0]
        out = f"{scheme}://{user}:***{rest[len(userinfo):]}"
    # The query (?password=...) and the key=value form (password=... or password='...').
    return re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)", r"\1***", out)


class Config(_Base, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The whole configuration of one relayd process."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    smtp: SmtpConfig = msgspec.field(default_factory=SmtpConfig)
    credentials: CredentialsConfig = msgspec.field(default_factory=CredentialsConfig)
    delivery: DeliveryConfig = msgspec.field(default_factory=DeliveryConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    dkim: DkimConfig = msgspec.field(default_factory=DkimConfig)
    dns: DnsConfig = msgspec.field(default_factory=DnsConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    control: ControlConfig = msgspec.field(default_factory=ControlConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    webhooks: WebhooksConfig = msgspec.field(default_factory=WebhooksConfig)

    def ignored_settings(self) -> list[str]:
        """The removed settings this configuration still sets ("section.key"), ignored."""
        return [name for name in REMOVED_SETTINGS
                if getattr(getattr(self, name.partition(".")[0]),
                           name.partition(".")[2]) is not msgspec.UNSET]

    @property
    def control_socket(self) -> str:
        """Path of the control socket (defaults to DATA_DIR/control.sock)."""
        return self.control.socket or str(Path(self.server.data_dir) / "control.sock")

    @property
    def database_path(self) -> str:
        """Path of the SQLite spool."""
        return str(Path(self.server.data_dir) / "relayd.sqlite3")

    @property
    def delivery_log_path(self) -> str:
        """Path of the delivery log's database, beside the spool."""
        return str(Path(self.server.data_dir) / "relayd-log.sqlite3")


def _wrap(exc: msgspec.ValidationError | msgspec.DecodeError, origin: str) -> ConfigError:
    text = str(exc)
    # msgspec says "... - at `$.smtp.listen`"; turn the path into a TOML key.
    text = text.replace("`$.", "`").replace("at `$`", "at top level")
    return ConfigError(f"{origin}: {text}")


def loads(text: str | bytes, origin: str = "<config>") -> Config:
    """Decode TOML text into a Config; raise ConfigError naming the bad key."""
    try:
        return msgspec.toml.decode(text, type=Config)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _wrap(exc, origin) from None


def load(path: str | Path) -> Config:
    """Read and decode a TOML configuration file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return loads(data, str(path))


class Located(msgspec.Struct, frozen=True, kw_only=True):
    """Where the configuration comes from: a file, or the built-in defaults."""

    path: str | None  # None: no file, the built-in defaults
    source: Literal["--config", "RELAYD_CONFIG", "system", "built-in"]


def locate(cli_path: str | None, env_path: str | None, system_path: str,
           system_exists: bool) -> Located:
    """Choose the configuration file like other daemons do.

    ``--config`` (``cli_path``), else ``$RELAYD_CONFIG`` (``env_path``; empty
    means unset), else ``system_path`` when it exists, else no file: the
    built-in defaults (a development setup, spool in ``./var``). A named file
    that does not exist is not skipped: loading it is the error.
    """
    if cli_path:
        return Located(path=cli_path, source="--config")
    if env_path:
        return Located(path=env_path, source="RELAYD_CONFIG")
    if system_exists:
        return Located(path=system_path, source="system")
    return Located(path=None, source="built-in")


def default_file_text() -> bytes:
    """The documented default configuration file (config/relayd.toml), from package data."""
    return resources.files("relayd").joinpath("data", "relayd.toml").read_bytes()


def with_overrides(
    cfg: Config,
    *,
    listen: str | None = None,
    data_dir: str | None = None,
    control_socket: str | None = None,
    metrics_listen: str | None = None,
    smarthost: str | None = None,
    cluster_dsn: str | None = None,
    node_name: str | None = None,
) -> Config:
    """Apply command-line overrides (the stable flag contract) and re-validate."""
    raw = msgspec.to_builtins(cfg)
    if listen is not None:
        raw["smtp"]["listen"] = listen
    if data_dir is not None:
        raw["server"]["data_dir"] = data_dir
    if control_socket is not None:
        raw["control"]["socket"] = control_socket
    if metrics_listen is not None:
        raw["metrics"]["listen"] = metrics_listen
    if smarthost is not None:
        raw["delivery"]["smarthost"] = smarthost
        raw["delivery"]["mode"] = "smarthost"
    if cluster_dsn is not None:
        raw["cluster"]["dsn"] = cluster_dsn
    if node_name is not None:
        raw["cluster"]["node_name"] = node_name
    try:
        return msgspec.convert(raw, type=Config)
    except msgspec.ValidationError as exc:
        raise _wrap(exc, "command line") from None
