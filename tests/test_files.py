"""sslam.files: small JSON records read back without trusting them. (Atomic writes and output
folders are tested with the checkpoints and runs that use them.)"""

import json

from sslam.files import read_json_object


def test_read_json_object_gives_the_object_or_none(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"format": "sslam", "n": [1, 2]}))
    assert read_json_object(good) == {"format": "sslam", "n": [1, 2]}
    cases = {"list.json": b"[1, 2]", "text.json": b"not json", "latin1.json": '{"a": "\xe9"}'.encode("latin-1"),
             "deep.json": b"[" * 200_000 + b"]" * 200_000, "big.json": b'{"a": ' + b"9" * 5000 + b"}"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert read_json_object(tmp_path / name) is None, name
    assert read_json_object(tmp_path / "missing.json") is None
    assert read_json_object(tmp_path) is None  # a folder
