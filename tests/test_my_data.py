"""Issue 13, item 6: a user's data export is served only to them, is kept in no file or shared
cache, and does not outlive "Delete all my data". Driven over HTTP through Gradio's own API,
as the probe did, against the real app served in-process with logins on."""

import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app.my_data import DataLinks, remove_legacy_exports
from app.service import ChatService
from app.users import add_user
from bench.inprocess import ScriptedEngine, serve

MARKER = "my-very-own-secret-7f3a9"


@contextmanager
def _login(url: str, name: str):
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/login", data={"username": name, "password": f"{name}-password"}).status_code == 200
        yield client


def _call(client: httpx.Client, api_name: str, *data):
    """One call of a Gradio endpoint through its HTTP API; returns the outputs."""
    event = client.post(f"/gradio_api/call/{api_name}", json={"data": list(data)}).json()["event_id"]
    text = client.get(f"/gradio_api/call/{api_name}/{event}").text
    assert "event: complete" in text, text
    return json.loads(text.split("event: complete\ndata:", 1)[1].strip().splitlines()[0])


def _link(outputs) -> str:
    """The download address the export endpoint handed out: a file's URL, or our link."""
    out = outputs[0]
    value = out.get("value") if isinstance(out, dict) and "__type__" in out else out  # gr.update(value=...)
    if isinstance(value, dict):  # a gr.File value
        return value["url"]
    return re.search(r"\((/my-data/[^)\s]+)\)", value).group(1)


def _files_holding(marker: str, since: float) -> list[str]:
    """Files written since ``since`` that hold ``marker``: in the temp dir itself (where the
    export used to go) and anywhere in Gradio's cache."""
    from gradio.utils import get_upload_folder

    candidates = list(Path(tempfile.gettempdir()).glob("*")) + list(Path(get_upload_folder()).rglob("*"))
    hits = []
    for path in candidates:
        try:
            if path.is_file() and path.stat().st_mtime >= since and marker.encode() in path.read_bytes():
                hits.append(str(path))
        except OSError:
            continue
    return hits


@pytest.fixture
def two_users(session_factory, settings):
    add_user(session_factory, "alice", "user", "alice-password")
    add_user(session_factory, "bob", "user", "bob-password")
    service = ChatService(ScriptedEngine("ok"), session_factory, settings)
    list(service.send("alice", f"Remember {MARKER}"))
    return service


def test_data_export_is_served_once_to_its_owner_only_and_written_nowhere(two_users):
    """Alice's export link: Bob (logged in) and a caller without login get 404; Alice gets her
    JSON (no-store, as an attachment) once; no file anywhere in the temp dir or Gradio's cache
    holds her data."""
    start = time.time() - 1
    with serve(two_users) as url, _login(url, "alice") as alice, _login(url, "bob") as bob:
        link = _link(_call(alice, "export_my_data"))
        assert bob.get(link).status_code == 404
        assert httpx.get(httpx.URL(url).join(link)).status_code in (401, 403, 404)
        got = alice.get(link)
        assert got.status_code == 200, got.text
        assert MARKER in got.text and got.json()["user"]["name"] == "alice"
        assert "no-store" in got.headers["cache-control"] and "attachment" in got.headers["content-disposition"]
        assert alice.get(link).status_code == 404  # one time
    assert _files_holding(MARKER, start) == []


def test_delete_all_my_data_also_ends_the_export(two_users):
    """After "Delete all my data", the export link Alice got before it serves nothing."""
    with serve(two_users) as url, _login(url, "alice") as alice:
        link = _link(_call(alice, "export_my_data"))
        _call(alice, "delete_my_data", True)
        assert alice.get(link).status_code == 404
        assert MARKER not in alice.get(link).text


def test_an_admins_training_export_is_a_one_time_link_for_that_admin_only(two_users, session_factory):
    """Admin > Data > Export gives a link, not a gr.File (which Gradio would copy into its cache and
    serve to anyone logged in with the URL): another admin, a user and a caller without login get
    404; the exporting admin gets the JSONL once, not cached; a demoted admin's link stops working."""
    from feedback import repository

    add_user(session_factory, "root", "admin", "root-password")
    add_user(session_factory, "root2", "admin", "root2-password")
    start = time.time() - 1
    with serve(two_users) as url, _login(url, "root") as root, _login(url, "root2") as root2, \
            _login(url, "alice") as alice:
        outputs = _call(root, "export_data", "preferences")
        link = re.search(r"\((/admin-export/[^)\s]+)\)", outputs[1]).group(1)
        assert root2.get(link).status_code == 404 and alice.get(link).status_code == 404
        assert httpx.get(httpx.URL(url).join(link)).status_code in (401, 403, 404)
        got = root.get(link)
        assert got.status_code == 200 and "no-store" in got.headers["cache-control"]
        assert root.get(link).status_code == 404  # one time
        second = re.search(r"\((/admin-export/[^)\s]+)\)", _call(root, "export_data", "sft")[1]).group(1)
        with session_factory.begin() as s:
            repository.set_role(session=s, name="root", role="user")
        assert root.get(second).status_code == 404  # no longer an admin
    from gradio.utils import get_upload_folder

    assert [p for p in Path(get_upload_folder()).rglob("*.jsonl") if p.stat().st_mtime >= start] == []


def test_local_mode_link_needs_no_login(session_factory, settings):
    """Single-user local mode (no logins): the link serves the local user's data."""
    service = ChatService(ScriptedEngine("ok"), session_factory, settings)
    list(service.send("local", f"Remember {MARKER}"))
    with serve(service) as url, httpx.Client(base_url=url, timeout=30) as client:
        got = client.get(_link(_call(client, "export_my_data")))
        assert got.status_code == 200 and MARKER in got.text


def test_links_expire_and_a_new_one_replaces_the_old():
    """A link past its time opens nothing, and issuing a new link ends the user's previous one."""
    links = DataLinks(ttl_s=0.05)
    old = links.issue("alice").rsplit("/", 1)[1]
    new = links.issue("alice").rsplit("/", 1)[1]
    assert links.take(old, "alice") is None
    time.sleep(0.1)
    assert links.take(new, "alice") is None


def test_exports_left_by_earlier_versions_are_removed(tmp_path, monkeypatch):
    """At start-up the JSON exports that earlier versions wrote to the temp dir and to Gradio's
    cache are deleted; other files stay."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    (tmp_path / "gradio" / "abc123").mkdir(parents=True)
    old = [tmp_path / "my-chat-data-x1.json", tmp_path / "gradio" / "abc123" / "my-chat-data-x1.json"]
    other = tmp_path / "gradio" / "abc123" / "upload.jsonl"
    for p in [*old, other]:
        p.write_text("{}")
    assert remove_legacy_exports() == 2
    assert not any(p.exists() for p in old) and other.exists()
    assert os.listdir(tmp_path / "gradio" / "abc123") == ["upload.jsonl"]
