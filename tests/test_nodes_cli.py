"""Operating a cluster from relayctl (issue 15): ``node list`` / ``node forget`` and the
``propagation`` of answers that take rights away.

On a single node (real relay, real socket, real relayctl process): the API answers 409
``not_clustered`` and relayctl fails with one line naming the cause; the answers of
disable, reset-password, delete and domain delete carry no ``propagation`` key (the
same JSON as before cluster mode). The cluster side is the app's cluster node behind
``Shared.cluster``: a stand-in object there checks that the operations reach it and
that its answers and refusals come through the real socket and CLI. The CLI's
formatters are checked on decoded Structs."""

from __future__ import annotations

import argparse
import json

import msgspec
import pytest

from control import schemas
from control.cli import Cli, node_table, propagation_text
from tests.conftest import RelayHandle
from tests.test_relayctl import relayctl

SINGLE = "this relayd is a single node (no [cluster] dsn)"


async def test_single_node_api_refuses_node_operations(relay: RelayHandle) -> None:
    """GET /v1/nodes and POST /v1/nodes/x/forget: 409 ``not_clustered``."""
    for method, path in (("GET", "/v1/nodes"), ("POST", "/v1/nodes/x/forget")):
        status, body = await relay.ctl.call(method, path)
        assert (status, body) == (409, {"error": SINGLE, "code": "not_clustered"})


async def test_single_node_relayctl_node_commands_fail_in_one_line(
        relay: RelayHandle) -> None:
    """relayctl node list / node forget x: exit 1, one stderr line naming the cause."""
    for args in (("node", "list"), ("--json", "node", "list"), ("node", "forget", "x")):
        rc, out, err = await relayctl(relay.ctl.path, *args)
        assert (rc, out, err) == (1, "", f"relayctl: {SINGLE}\n"), args


async def test_single_node_answers_carry_no_propagation(relay: RelayHandle) -> None:
    """disable, reset-password, delete and domain delete answer exactly today's fields."""
    await relay.ctl.add_domain("example.com")
    user, _ = await relay.ctl.add_user("example.com")
    answers = {
        "disable": await relay.ctl.ok("POST", f"/v1/users/{user}/disable"),
        "reset": await relay.ctl.ok("POST", f"/v1/users/{user}/reset-password"),
        "delete": await relay.ctl.ok("POST", f"/v1/users/{user}/delete", {"confirm": user}),
        "domain": await relay.ctl.ok("POST", "/v1/domains/example.com/delete",
                                     {"confirm": "example.com"}),
    }
    assert set(answers["disable"]) == {"username", "domain", "status", "disabled_reason",
                                       "created_at", "last_connection", "total_sent",
                                       "queued", "networks", "limits"}
    assert answers["disable"]["last_connection"] is None  # a None without default stays
    # the account was disabled above: the answer says it stays so (issue 16 item 9)
    assert set(answers["reset"]) == {"username", "password", "note"}
    assert set(answers["delete"]) == {"username", "purged"}
    assert set(answers["domain"]) == {"name", "accounts_disabled", "messages_held", "held",
                                      "retrying", "purged"}


async def test_single_node_relayctl_prints_nothing_about_propagation(
        relay: RelayHandle) -> None:
    """relayctl user disable on a single node: stdout as before and an empty stderr."""
    await relay.ctl.add_domain("example.com")
    user, _ = await relay.ctl.add_user("example.com")
    rc, out, err = await relayctl(relay.ctl.path, "user", "disable", user)
    assert (rc, out, err) == (0, f"{user}: disabled\n", "")


# --- formatters, on decoded Structs ----------------------------------------------------

def _decoded(kind: type[msgspec.Struct], raw: str) -> msgspec.Struct:
    return msgspec.json.decode(raw.encode(), type=kind)


def test_propagation_line_names_acknowledged_and_gone_nodes() -> None:
    """One line: how many nodes acknowledged and which; the gone ones after, if any."""
    p = _decoded(schemas.Propagation, '{"version": 7, "acknowledged": ["a", "b", "c"],'
                                      ' "gone": ["d"]}')
    assert isinstance(p, schemas.Propagation)
    assert propagation_text(p) == \
        "acknowledged by 3 node(s): a, b, c; not waited for (gone): d"
    p = _decoded(schemas.Propagation, '{"version": 8, "acknowledged": ["a"]}')
    assert isinstance(p, schemas.Propagation) and p.gone == []
    assert propagation_text(p) == "acknowledged by 1 node(s): a"


@pytest.mark.parametrize("as_json", [False, True])
def test_answer_with_propagation_adds_one_stderr_line(
        capsys: pytest.CaptureFixture[str], as_json: bool) -> None:
    """An answer carrying ``propagation``: stdout as without it, one line on stderr."""
    cli = Cli(argparse.Namespace(json=as_json, socket="/nonexistent"))
    bare = _decoded(schemas.UserDeleted, '{"username": "u1", "purged": 0}')
    cli.out(bare, "deleted u1")
    plain_out, plain_err = capsys.readouterr()
    assert plain_err == ""
    with_p = _decoded(schemas.UserDeleted, '{"username": "u1", "purged": 0, "propagation":'
                      ' {"version": 3, "acknowledged": ["n1", "n2"], "gone": ["n3"]}}')
    cli.out(with_p, "deleted u1")
    out, err = capsys.readouterr()
    assert err == "acknowledged by 2 node(s): n1, n2; not waited for (gone): n3\n"
    if as_json:
        assert json.loads(out)["propagation"]["acknowledged"] == ["n1", "n2"]
        assert {k: v for k, v in json.loads(out).items() if k != "propagation"} == \
            json.loads(plain_out)
    else:
        assert out == plain_out == "deleted u1\n"


def test_node_table_marks_the_answering_node() -> None:
    """The table: version line, a header, ``*`` on the answering node only."""
    lst = _decoded(schemas.NodeList, json.dumps({"version": 5, "nodes": [
        {"name": "x", "address": "10.0.0.1:25", "applied_version": 5, "behind": 0,
         "heartbeat_age_seconds": 1.25, "state": "fenced", "queue_depth": 12, "this": False},
        {"name": "y", "address": "10.0.0.2:25", "applied_version": 5, "behind": 0,
         "heartbeat_age_seconds": 0.0, "state": "live", "queue_depth": 0, "this": True}]}))
    assert isinstance(lst, schemas.NodeList)
    lines = node_table(lst).splitlines()
    assert lines[0] == "control-plane version 5"
    assert lines[2].startswith(" ") and lines[2].split()[:3] == ["x", "10.0.0.1:25", "fenced"]
    assert lines[3].startswith("*") and lines[3].split()[1:4] == ["y", "10.0.0.2:25", "live"]
