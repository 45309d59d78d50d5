"""Configuration: strict keys, errors that name the key, the flag contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relayd import config

REPO = Path(__file__).resolve().parent.parent


def _error(text: str) -> str:
    with pytest.raises(config.ConfigError) as info:
        config.loads(text)
    return str(info.value)


def test_shipped_config_is_valid() -> None:
    """config/relayd.toml loads, and documents every setting with its default."""
    cfg = config.load(REPO / "config" / "relayd.toml")
    assert cfg.smtp.listen == "127.0.0.1:2525"
    assert cfg.server.data_dir == "./var"


def test_unknown_key_is_named() -> None:
    """A typo in a key is an error naming that key and its table."""
    msg = _error('[smtp]\nmax_recipents = 5\n')
    assert "max_recipents" in msg and "smtp" in msg


def test_unknown_table_is_named() -> None:
    """An unknown top-level table is an error naming it."""
    assert "smtpd" in _error('[smtpd]\nlisten = "x"\n')


def test_bad_value_names_the_key() -> None:
    """A value of the wrong type or out of range names the key."""
    assert "limits.per_minute" in _error('[limits]\nper_minute = "ten"\n')
    assert "smtp.max_recipients" in _error('[smtp]\nmax_recipients = 0\n')
    assert "delivery.mode" in _error('[delivery]\nmode = "carrier-pigeon"\n')


def test_bad_address_names_the_key() -> None:
    """A malformed HOST:PORT names the key it came from."""
    assert "listen" in _error('[smtp]\nlisten = "no-port-here"\n')
    assert "smarthost" in _error('[delivery]\nsmarthost = "host:99999"\n')


def test_overrides_replace_file_values(tmp_path: Path) -> None:
    """Command-line overrides win over the file."""
    cfg = config.with_overrides(config.Config(), listen="127.0.0.1:2600",
                                data_dir=str(tmp_path), smarthost="10.0.0.1:25",
                                metrics_listen="", control_socket=str(tmp_path / "c.sock"))
    assert cfg.smtp.listen == "127.0.0.1:2600"
    assert cfg.server.data_dir == str(tmp_path)
    assert cfg.delivery.smarthost == "10.0.0.1:25"
    assert cfg.metrics.listen == ""
    assert cfg.control_socket == str(tmp_path / "c.sock")


def test_bad_override_is_an_error() -> None:
    """A malformed override is reported like a file error."""
    with pytest.raises(config.ConfigError) as info:
        config.with_overrides(config.Config(), listen="nonsense")
    assert "listen" in str(info.value)


def _relayd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relayd.app", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_check_config_accepts_a_good_file() -> None:
    """relayd --check-config exits 0 on the shipped file."""
    r = _relayd("--config", "config/relayd.toml", "--check-config")
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_check_config_rejects_a_bad_file(tmp_path: Path) -> None:
    """relayd --check-config exits 2 with one line naming the key, no traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[smtp]\nlisten = "127.0.0.1:2525"\nbogus_key = 1\n')
    r = _relayd("--config", str(bad), "--check-config")
    assert r.returncode == 2
    assert "bogus_key" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    """A config path that does not exist is a one-line error, exit 2."""
    r = _relayd("--config", str(tmp_path / "nope.toml"), "--check-config")
    assert r.returncode == 2
    assert "cannot read" in r.stderr
