"""llama-server's ``POST /slots/{id}?action=save|restore|erase`` (issue 30): an idle slot's prompt
cache written to ``--slot-save-path`` and read back, so a later request with that prefix prefills
only the rest; file names that would leave the folder, busy or unknown slots and foreign files
are 4xx answers."""
from __future__ import annotations

import httpx
import pytest

from server_util import Server

PROMPT = "Slots keep prompts. " * 40


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_path):
    folder = tmp_path_factory.mktemp("slots")
    s = Server(["--model", tiny_model_path, "-np", "1", "-c", "2048", "--slot-save-path", folder],
               tmp_path_factory.mktemp("srv") / "slots.log")
    s.folder = folder
    yield s
    assert s.stop() == 0, s.log()


def _complete(srv):
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4,
                                                      "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["text"], body["usage"]["prompt_tokens_details"]["cached_tokens"]


def _slot(srv, action, slot=0, **body):
    return httpx.post(f"{srv.url}/slots/{slot}", params={"action": action}, json=body or None,
                      timeout=60)


def test_save_erase_restore_round_trip(srv):
    text, cached = _complete(srv)
    assert cached == 0
    r = _slot(srv, "save", filename="doc.bin")
    assert r.status_code == 200, r.text
    saved = r.json()
    assert saved["id_slot"] == 0 and saved["filename"] == "doc.bin" and saved["n_saved"] > 100
    assert saved["n_written"] == (srv.folder / "doc.bin").stat().st_size
    assert "save_ms" in saved["timings"]
    r = _slot(srv, "erase")
    assert r.json() == {"id_slot": 0, "n_erased": saved["n_saved"]}
    r = _slot(srv, "restore", filename="doc.bin")
    assert r.status_code == 200, r.text
    assert r.json()["n_restored"] == saved["n_saved"] and "restore_ms" in r.json()["timings"]
    again, cached = _complete(srv)
    assert again == text and cached > 100          # the restored cells served the prefix


@pytest.mark.parametrize("name", ["../escape.bin", "a/b.bin", "..", ".hidden", "", "x\x00y",
                                  "con:1", " pad "])
def test_file_names_that_leave_the_folder_are_refused(srv, name):
    r = _slot(srv, "save", filename=name)
    assert r.status_code == 400 and r.json()["error"]["param"] == "filename"


def test_bad_slot_actions_are_4xx(srv, tmp_path):
    assert _slot(srv, "restore", filename="missing.bin").status_code == 400
    assert _slot(srv, "fly", filename="x.bin").json()["error"]["param"] == "action"
    assert _slot(srv, "save", slot="x", filename="x.bin").json()["error"]["param"] == "id_slot"
    r = _slot(srv, "save", slot=9, filename="x.bin")
    assert r.status_code == 400 and r.json()["error"]["param"] == "id_slot"
    assert _slot(srv, "save").status_code == 400                    # no filename
    (srv.folder / "junk.bin").write_bytes(b"not a state at all" * 10)
    r = _slot(srv, "restore", filename="junk.bin")
    assert r.status_code == 400 and "could not restore" in r.json()["error"]["message"]
    assert _complete(srv)[0]                                           # still serving


def test_without_a_save_path_slots_are_not_served(tmp_path_factory, tiny_model_path):
    s = Server(["--model", tiny_model_path, "-np", "1", "-c", "512"],
               tmp_path_factory.mktemp("srv") / "noslots.log")
    try:
        r = _slot(s, "save", filename="a.bin")
        assert r.status_code == 501 and "slot-save-path" in r.json()["error"]["message"]
    finally:
        assert s.stop() == 0
