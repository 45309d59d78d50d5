"""The [cluster] section: validation naming each key, the secrets it points to
(never in a message), the node name, DSN redaction, the --cluster-dsn and
--node-name flags (the real ``relayd`` command), and [cluster] needing a restart.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relayd import config
from relayd.app import _config_changes, _keep_unreloadable, build_parser, load_config
from tests.procs import RelayProcess, free_port
from tests.test_ops_support import wait_log
from tests.test_reload_settings import _reload, _start

REPO = Path(__file__).resolve().parent.parent
DSN = "postgresql://relayd@127.0.0.1:5432/relayd"
PASSWORD = "s3cr3t-Pa55word"
KEY = bytes(range(32))


def _error(text: str) -> str:
    with pytest.raises(config.ConfigError) as info:
        config.loads(text)
    return str(info.value)


def _cluster(**keys: object) -> str:
    lines = [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "[cluster]\n" + "\n".join(lines) + "\n"


def _key_file(tmp: Path, data: bytes = KEY, text: str | None = None) -> Path:
    path = tmp / "cluster.key"
    path.write_text(text if text is not None else base64.b64encode(data).decode() + "\n")
    return path


# --- the section -------------------------------------------------------------------


def test_defaults_are_a_single_node() -> None:
    """No [cluster]: no DSN, cluster mode off, the documented intervals."""
    cc = config.Config().cluster
    assert not cc.enabled and cc.dsn == ""
    assert (cc.heartbeat_seconds, cc.fence_seconds, cc.gone_seconds) == (1.0, 5.0, 10.0)
    assert config.ClusterConfig(dsn=DSN, key_file="k").enabled


def test_shipped_file_documents_every_cluster_key() -> None:
    """config/relayd.toml has every [cluster] key at its default value."""
    text = (REPO / "config" / "relayd.toml").read_text()
    section = text.split("\n[cluster]\n", 1)[1]
    for key in config.ClusterConfig.__struct_fields__:
        assert f"\n{key} = " in "\n" + section, key
    assert config.load(REPO / "config" / "relayd.toml").cluster == config.ClusterConfig()


def test_a_valid_section_loads() -> None:
    """A DSN with key_file, a password file and a node name is accepted as written."""
    cfg = config.loads(_cluster(dsn=DSN, key_file="/etc/relayd/cluster.key",
                                password_file="/etc/relayd/pg.pass", node_name="relay-1.a_b",
                                heartbeat_seconds=2.0, fence_seconds=4.0, gone_seconds=4.5))
    assert cfg.cluster.enabled and cfg.cluster.node_name == "relay-1.a_b"
    assert config.loads(_cluster(dsn="postgres://u@h/db", key_file="k")).cluster.enabled


@pytest.mark.parametrize(("keys", "named"), [
    ({"dsn": "host=db user=relayd dbname=relayd", "key_file": "k"}, "cluster.dsn"),
    ({"dsn": "mysql://u@h/db", "key_file": "k"}, "cluster.dsn"),
    ({"dsn": DSN}, "cluster.key_file"),
    ({"password_file": "/a", "password_env": "PGPASS"}, "cluster.password_env"),
    ({"password_file": "/a", "password_env": "PGPASS"}, "cluster.password_file"),
    ({"heartbeat_seconds": 3.0}, "cluster.heartbeat_seconds"),
    ({"fence_seconds": 10.0}, "cluster.fence_seconds"),
    ({"gone_seconds": 4.0}, "cluster.fence_seconds"),
    ({"node_name": "-starts-with-a-dash"}, "cluster.node_name"),
    ({"node_name": "has space"}, "cluster.node_name"),
    ({"node_name": "x" * 64}, "cluster.node_name"),
    ({"heartbeat_seconds": 0.0}, "cluster.heartbeat_seconds"),
    ({"dns": DSN}, "dns"),
])
def test_each_validation_error_names_its_key(keys: dict[str, object], named: str) -> None:
    """Every refused [cluster] value is an error that names the key."""
    msg = _error(_cluster(**keys))
    assert named in msg and "cluster" in msg


@pytest.mark.parametrize("dsn", [
    f"postgresql://relayd:{PASSWORD}@127.0.0.1:5432/relayd",
    f"postgres://relayd:{PASSWORD}@db.example/relayd?sslmode=require",
    f"postgresql://relayd@db.example/relayd?sslmode=require&password={PASSWORD}",
    f"postgresql://relayd@db.example/relayd?password={PASSWORD}",
])
def test_password_in_the_dsn_is_refused(dsn: str) -> None:
    """A password in the DSN is refused, pointing at the two places it belongs; never echoed."""
    msg = _error(_cluster(dsn=dsn, key_file="k"))
    assert "cluster.dsn" in msg
    assert "cluster.password_file or cluster.password_env" in msg
    assert PASSWORD not in msg


# --- secrets -----------------------------------------------------------------------


def test_secrets_from_files(tmp_path: Path) -> None:
    """The password is the first line of password_file, stripped; the key is 32 bytes."""
    pw = tmp_path / "pg.pass"
    pw.write_text(f"  {PASSWORD}  \nsecond line ignored\n")
    cc = config.ClusterConfig(dsn=DSN, password_file=str(pw), key_file=str(_key_file(tmp_path)))
    secrets = config.cluster_secrets(cc, {})
    assert secrets.password == PASSWORD
    assert secrets.key == KEY
    assert PASSWORD not in repr(secrets) and KEY.hex() not in repr(secrets)


def test_secrets_from_the_environment(tmp_path: Path) -> None:
    """password_env names the variable of the mapping given; no password at all is None."""
    key = str(_key_file(tmp_path))
    cc = config.ClusterConfig(dsn=DSN, password_env="RELAYD_PG_PASSWORD", key_file=key)
    assert config.cluster_secrets(cc, {"RELAYD_PG_PASSWORD": PASSWORD}).password == PASSWORD
    nothing = config.ClusterConfig(dsn=DSN, key_file=key)
    assert config.cluster_secrets(nothing, {"RELAYD_PG_PASSWORD": PASSWORD}).password is None


def _secrets_error(cc: config.ClusterConfig, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(config.ConfigError) as info:
        config.cluster_secrets(cc, environ or {})
    return str(info.value)


def test_unset_variable_is_an_error(tmp_path: Path) -> None:
    """An unset or empty password variable names the key and the variable."""
    cc = config.ClusterConfig(dsn=DSN, password_env="RELAYD_PG_PASSWORD",
                              key_file=str(_key_file(tmp_path)))
    for environ in ({}, {"RELAYD_PG_PASSWORD": ""}):
        msg = _secrets_error(cc, environ)
        assert "cluster.password_env" in msg and "RELAYD_PG_PASSWORD" in msg


def test_unreadable_password_file_is_an_error(tmp_path: Path) -> None:
    """A missing, unreadable or empty password file names the key, without the password."""
    key = str(_key_file(tmp_path))
    missing = config.ClusterConfig(dsn=DSN, password_file=str(tmp_path / "nope"), key_file=key)
    assert "cluster.password_file" in _secrets_error(missing)
    # A directory cannot be read as a file, even by root (tests may run as root).
    pw_dir = tmp_path / "pw.d"
    pw_dir.mkdir()
    (pw_dir / "inside").write_text(PASSWORD)
    unreadable = config.ClusterConfig(dsn=DSN, password_file=str(pw_dir), key_file=key)
    msg = _secrets_error(unreadable)
    assert "cluster.password_file" in msg and PASSWORD not in msg
    empty = tmp_path / "empty.pass"
    empty.write_text("\n" + PASSWORD + "\n")  # the password on the second line: not read
    msg = _secrets_error(config.ClusterConfig(dsn=DSN, password_file=str(empty), key_file=key))
    assert "cluster.password_file" in msg and PASSWORD not in msg


@pytest.mark.parametrize("text", [
    "not base64 at all!!\n",
    base64.b64encode(bytes(range(31))).decode() + "\n",
    base64.b64encode(bytes(range(33))).decode() + "\n",
    base64.b64encode(KEY).decode()[:-4] + "\n",
    "",
])
def test_bad_key_file_is_an_error(tmp_path: Path, text: str) -> None:
    """A key that is not base64 of exactly 32 bytes names cluster.key_file, not its content."""
    cc = config.ClusterConfig(dsn=DSN, key_file=str(_key_file(tmp_path, text=text)))
    msg = _secrets_error(cc)
    assert "cluster.key_file" in msg
    if text.strip():
        assert text.strip() not in msg


def test_missing_key_file_is_an_error(tmp_path: Path) -> None:
    """A key_file that does not exist names the key and the path."""
    cc = config.ClusterConfig(dsn=DSN, key_file=str(tmp_path / "absent.key"))
    msg = _secrets_error(cc)
    assert "cluster.key_file" in msg and "absent.key" in msg


# --- node name, redaction ------------------------------------------------------------


def test_node_name() -> None:
    """cluster.node_name wins; else the host name, made to fit the allowed characters."""
    assert config.node_name(config.ClusterConfig(node_name="relay-2"), "host.example") == "relay-2"
    assert config.node_name(config.ClusterConfig(), "host.example") == "host.example"
    made = config.node_name(config.ClusterConfig(), "_my host/é" + "x" * 80)
    assert config.NODE_NAME_RE.fullmatch(made) and len(made) == 63
    assert made.startswith("my-host-")
    assert config.NODE_NAME_RE.fullmatch(config.node_name(config.ClusterConfig(), "..."))


@pytest.mark.parametrize(("dsn", "shown"), [
    (DSN, DSN),
    ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgres://u:p@ss/w@h/db?sslmode=require", "postgres://u:***@h/db?sslmode=require"),
    ("postgresql://u@h/db?sslmode=require&password=pw",
     "postgresql://u@h/db?sslmode=require&password=***"),
    ("postgresql://u@h/db?password=pw&sslmode=require",
     "postgresql://u@h/db?password=***&sslmode=require"),
    ("host=h password='a b' user=u", "host=h password=*** user=u"),
    ("host=h password=pw user=u", "host=h password=*** user=u"),
    ("", ""),
])
def test_redact_dsn(dsn: str, shown: str) -> None:
    """Any password in a DSN is replaced by ***; the rest stays readable."""
    assert config.redact_dsn(dsn) == shown


# --- command line ----------------------------------------------------------------------


def test_flags_override_the_file(tmp_path: Path) -> None:
    """--cluster-dsn and --node-name replace cluster.dsn and cluster.node_name."""
    cfg_file = tmp_path / "relayd.toml"
    cfg_file.write_text(_cluster(dsn="postgresql://old@h/db", key_file="k", node_name="old"))
    args = build_parser().parse_args(["--config", str(cfg_file), "--cluster-dsn", DSN,
                                      "--node-name", "relay-9"])
    cfg = load_config(args)
    assert (cfg.cluster.dsn, cfg.cluster.node_name) == (DSN, "relay-9")
    off = load_config(build_parser().parse_args(["--config", str(cfg_file), "--cluster-dsn", ""]))
    assert not off.cluster.enabled and off.cluster.node_name == "old"
    with pytest.raises(config.ConfigError) as info:
        config.with_overrides(config.Config(), node_name="bad name")
    assert "cluster.node_name" in str(info.value)


def _relayd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "RELAYD_CONFIG"}
    environ["RELAYD_SYSTEM_CONFIG"] = "/nonexistent/relayd.toml"
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "relayd.app", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=environ)


def test_check_config_without_key_file() -> None:
    """relayd --check-config --cluster-dsn without key_file: exit 2 naming cluster.key_file."""
    r = _relayd("--check-config", "--cluster-dsn", "postgresql://u@127.0.0.1:1/db")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cluster.key_file" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_config_reads_the_secrets(tmp_path: Path) -> None:
    """--check-config with a DSN reads the key and password: a bad one is exit 2, named."""
    cfg_file = tmp_path / "relayd.toml"
    key = _key_file(tmp_path)
    cfg_file.write_text(_cluster(key_file=str(key), password_env="RELAYD_TEST_PG_PASSWORD"))
    flags = ("--config", str(cfg_file), "--check-config", "--cluster-dsn", DSN,
             "--node-name", "relay-1")
    ok = _relayd(*flags, env={"RELAYD_TEST_PG_PASSWORD": PASSWORD})
    assert ok.returncode == 0, ok.stderr
    assert PASSWORD not in ok.stdout + ok.stderr
    unset = _relayd(*flags)
    assert unset.returncode == 2 and "cluster.password_env" in unset.stderr
    key.write_text("dG9vIHNob3J0\n")  # base64 of 9 bytes
    bad = _relayd(*flags, env={"RELAYD_TEST_PG_PASSWORD": PASSWORD})
    assert bad.returncode == 2 and "cluster.key_file" in bad.stderr
    assert PASSWORD not in bad.stderr
    bad_name = _relayd("--config", str(cfg_file), "--check-config", "--node-name=-x")
    assert bad_name.returncode == 2 and "cluster.node_name" in bad_name.stderr
    # Without a DSN nothing is read: a single node needs neither secret.
    assert _relayd("--config", str(cfg_file), "--check-config").returncode == 0


# --- reload ------------------------------------------------------------------------------


def test_cluster_is_not_reloadable() -> None:
    """A changed [cluster] is reported as needing a restart, and the old values stay."""
    old = config.Config()
    new = config.loads(_cluster(dsn=DSN, key_file="/k", node_name="n1", heartbeat_seconds=2.0))
    applied, ignored = _config_changes(old, new)
    assert applied == []
    assert set(ignored) == {"cluster.dsn", "cluster.key_file", "cluster.node_name",
                            "cluster.heartbeat_seconds"}
    assert _keep_unreloadable(old, new).cluster == old.cluster


@pytest.mark.slow
async def test_reload_with_a_changed_cluster_needs_a_restart(
        tmp_path: Path, procs: list[RelayProcess]) -> None:
    """SIGHUP with a new [cluster] logs reload_needs_restart naming the keys, not the DSN."""
    rp = await _start(tmp_path, smarthost=f"127.0.0.1:{free_port()}")
    procs.append(rp)
    line = await _reload(rp, cluster=f'dsn = "{DSN}"\nkey_file = "/nonexistent.key"')
    assert line["changed"] == []
    (warning,) = await wait_log(rp, "reload_needs_restart")
    assert warning["settings"] == ["cluster.dsn", "cluster.key_file"]
    assert DSN not in rp.log.read_text()
