"""Every `python -m bench ...` command in README.md and docs/ runs as written: its parser accepts its arguments,
every sweep file it names passes `bench sweep FILE --check` as far as a fresh clone can (all but the external
data and weights), and a command that runs a paper budget says what it costs on a GPU and on the CPU."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from bench.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# synopsis placeholders whose argument is typed or a choice: a value the parser accepts
PLACEHOLDERS = {"G": "1", "SECTION": "loader"}


def _blocks(text: str) -> list[tuple[int, str]]:
    """(offset, body) of each fenced code block."""
    return [(m.start(), m.group(1)) for m in re.finditer(r"```[^\n]*\n(.*?)```", text, flags=re.S)]


def documented_commands() -> list[tuple[str, str]]:
    """(doc, command) for each `python -m bench` command of a code block or an inline code span."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for _, body in _blocks(text):
            for line in re.sub(r"\\\n\s*", " ", body).splitlines():
                for part in re.split(r"&&|;|\|", line):
                    part = part.split(" #")[0].strip()
                    if part.startswith("python -m bench "):
                        out.append((doc.name, part))
        inline = re.sub(r"```.*?```", "", text, flags=re.S)
        out += [(doc.name, " ".join(c.split())) for c in re.findall(r"`(python -m bench [^`]*)`", inline)]
    return out


def _argv(command: str) -> list[str]:
    """The arguments after `python -m bench`, synopsis brackets and `...` dropped, placeholders filled."""
    words = shlex.split(command.replace("[", " ").replace("]", " "))[3:]
    return [PLACEHOLDERS.get(w, w) for w in words if w != "..."]


COMMANDS = documented_commands()
# the sweep files the docs name (not in a quoted error message, whose file is an example)
SWEEP_FILES = sorted({f for doc in DOCS for line in doc.read_text().splitlines() if "error:" not in line
                      for f in re.findall(r"tune_spaces/[A-Za-z0-9_.-]+\.yaml", line)})


def test_the_docs_hold_the_commands():
    assert len(COMMANDS) >= 40
    verbs = {_argv(c)[0] for _, c in COMMANDS}
    assert verbs >= {"run", "sweep", "shards", "leaderboard", "perf", "reproduce"}
    assert len(SWEEP_FILES) >= 8


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{d}:{c[16:60]}" for d, c in COMMANDS])
def test_documented_command_parses(doc, command):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(_argv(command))
    except SystemExit:
        pytest.fail(f"{doc}: `{command}`: {err.getvalue().strip().splitlines()[-1]}")


def test_parse_check_catches_a_flag_that_does_not_exist():
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        build_parser().parse_args(_argv("python -m bench run --method amt --budget paper"))


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_documented_sweep_file_checks(name, shards_root, monkeypatch):
    """What `bench sweep FILE --check` does, in one process: every config resolves, and the trials' inputs are
    found, except the external data sets and weights a fresh clone does not have (never the embedded digits)."""
    from bench.sweep.phases import check
    from bench.sweep.space import SweepError, check_trial_inputs, load_sweep

    path = ROOT / name
    assert path.is_file(), f"the docs name {name}, which does not exist"
    monkeypatch.chdir(ROOT)
    spec = load_sweep(path).with_absolute_paths(ROOT)
    check(spec)
    try:
        assert check_trial_inputs(spec, shards_root) >= 1
    except SweepError as e:
        msg = str(e)
        external = re.search(r"no shards for data set '([^']+)'", msg)
        assert (external and external.group(1) != "digits") or re.search(r"weights file .* does not exist", msg), msg


def _paper_budget(command: str) -> bool:
    """A command that runs a paper preset: a paper sweep (not --check), or a run of a few-shot method at its
    default (paper) budgets."""
    argv = _argv(command)
    if argv[:1] == ["sweep"]:
        return "paper_" in argv[1] and "--check" not in argv
    return argv[:1] == ["run"] and any(m in argv for m in ("amt", "pmf", "protonet_lora")) and "--set" not in argv


def test_paper_budget_commands_say_what_they_cost():
    """The block that holds a paper-budget command, or the paragraph just before it, names its GPU cost and
    its CPU cost."""
    found = 0
    for doc in DOCS:
        text = doc.read_text()
        for start, body in _blocks(text):
            commands = [c for line in re.sub(r"\\\n\s*", " ", body).splitlines()
                        if (c := line.split(" #")[0].strip()).startswith("python -m bench ")]
            if not any(_paper_budget(c) for c in commands):
                continue
            found += 1
            context = "\n".join(text[:start].splitlines()[-12:]) + body
            assert re.search(r"GPU", context) and re.search(r"CPU", context), f"{doc.name}: {commands[0]}"
    assert found >= 4
