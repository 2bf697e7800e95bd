"""Every error about a bad input file names the file (and, for YAML and JSON, the line and column), in one line."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.sweep.space import SweepError, load_sweep
from data_shards.manifest import read_manifest
from data_shards.paths import dataset_dir


def _malformed_manifest(tmp: Path):
    d = tmp / "digits"
    d.mkdir()
    (d / "_info.json").write_text('{"name": "digits",\n "classes": ["zero", "one"],\n "image_size": [32, "3')
    return lambda: read_manifest(d), [str(d / "_info.json"),
                                      "not valid JSON (Unterminated string starting) at line 3 column 21",
                                      "python -m bench shards make digits"]


def _binary_manifest(tmp: Path):
    d = tmp / "digits"
    d.mkdir()
    (d / "_info.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    return lambda: read_manifest(d), [str(d / "_info.json"), "not a text (UTF-8) manifest (byte 0)"]


def _binary_sweep(tmp: Path):
    f = tmp / "sweep.yaml"
    f.write_bytes(b"methods: [rft]\n\xff\xfe\x00\x01")
    return lambda: load_sweep(f), [str(f), "not a text (UTF-8) sweep file (byte 15)"]


def _broken_yaml(tmp: Path):
    f = tmp / "sweep.yaml"
    f.write_text("name: s\nmethods: [rft\nfixed: {epochs: 1}\n")
    return lambda: load_sweep(f), [str(f), "not valid YAML at line 3 column 6", "expected ',' or ']'"]


def _bad_indent_yaml(tmp: Path):
    f = tmp / "sweep.yaml"
    f.write_text("methods: [rft]\nfixed:\n  epochs: 1\n lr: 0.1\n")
    return lambda: load_sweep(f), [str(f), "not valid YAML at line 4 column 2"]


def _deleted_manifest(tmp: Path):
    d = tmp / "root" / "digits"
    d.mkdir(parents=True)
    for i in range(3):
        (d / f"train-{i:06d}.tar").write_bytes(b"")
    return lambda: dataset_dir("digits", tmp / "root"), [
        str(d), "holds 3 shard file(s) but no _info.json", "interrupted or the file deleted",
        f"python -m bench shards make digits --out {tmp / 'root'}"]


def _empty_data_root(tmp: Path):
    root = tmp / "empty"
    root.mkdir()
    # the suggested command writes where the reader looked, even when that is this process's $BENCH_SHARDS
    return lambda: dataset_dir("digits", root), [f"no shards for data set 'digits' under {root}",
                                                 f"python -m bench shards make digits --out {root}"]


CASES = {"malformed _info.json": (_malformed_manifest, ValueError),
         "binary _info.json": (_binary_manifest, ValueError),
         "binary sweep file": (_binary_sweep, SweepError),
         "broken YAML": (_broken_yaml, SweepError),
         "YAML indentation": (_bad_indent_yaml, SweepError),
         "deleted manifest": (_deleted_manifest, FileNotFoundError),
         "empty --data-root": (_empty_data_root, FileNotFoundError)}


@pytest.mark.parametrize("case", list(CASES))
def test_message_names_the_file(tmp_path, monkeypatch, case):
    make, error = CASES[case]
    monkeypatch.setenv("BENCH_SHARDS", str(tmp_path / "empty"))
    call, parts = make(tmp_path)
    with pytest.raises(error) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, msg
