"""The daemon's status file is a convenience: a disk that refuses it is
said once and counted, and never stops the daemon."""

from __future__ import annotations

import json
import logging

from streamer.daemon import Session


def bare_session(path) -> Session:
    s = object.__new__(Session)     # only what write_status uses
    s._status_file = path
    s.status_errors = 0
    s._status_error = None
    s.status = lambda: {"pid": 1}
    return s


def test_a_status_file_that_cannot_be_written_is_logged_once_and_counted(tmp_path, caplog):
    s = bare_session(tmp_path / "gone" / "x.status.json")    # its directory does not exist
    with caplog.at_level(logging.ERROR, logger="streamer.daemon"):
        for _ in range(3):
            s.write_status()
    assert s.status_errors == 3
    assert len([r for r in caplog.records if "cannot be written" in r.message]) == 1
    (tmp_path / "gone").mkdir()
    s.write_status()
    assert json.loads((tmp_path / "gone" / "x.status.json").read_text()) == {"pid": 1}
    assert s._status_error is None
