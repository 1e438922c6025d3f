"""Every `python -m ...` command shown in README.md, docs/ and weights/README.md parses as written: the module
exists and its argument parser takes every flag and value (the command is stopped right after parsing, so nothing
runs). The README's first commands are run for real by tests/test_readme.py and tests/test_cli.py."""
import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "weights" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENTRY = {"tools.bench": "tools.bench.__main__", "tools.eval": "tools.eval.evaluate"}


class Parsed(Exception):
    """Raised by the patched parse_args once the arguments are parsed: the command is stopped there."""


def commands():
    """(page, line, module, argv) for each `python -m MODULE ...` or `torchrun ... -m MODULE ...` in a ```bash
    block (backslash-continued lines joined, a `#` comment ends a line) or in an inline code span of the prose (a
    synopsis with `...` or `[optional]` parts is not a command to type, and is left out)."""
    found = []
    for page in PAGES:
        if not page.is_file():
            continue
        text = page.read_text()
        lines = []
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
            lines += [ln.split(" #")[0].strip() for ln in block.replace("\\\n", " ").splitlines()]
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        lines += [" ".join(span.split()) for span in re.findall(r"`((?:python3? -m|torchrun) [^`]+)`", prose)]
        for line in lines:
            m = re.search(r"(?:python3? -m|torchrun\b.*? -m) ([\w.]+)(.*)", line)
            if m and m.group(1) not in ("pip", "venv", "pytest") and "..." not in line and "[" not in line:
                args = re.split(r"\s+(?:\d*>|\||&&|;)", m.group(2))[0]   # the shell's redirections and pipes end it
                found.append((page.relative_to(ROOT), line, m.group(1), shlex.split(args)))
    return found


def test_the_pages_show_commands():
    assert len(commands()) >= 10, [c[1] for c in commands()]


@pytest.mark.parametrize("page, line, module, argv", commands(),
                         ids=lambda x: str(x)[:60] if isinstance(x, str) else None)
def test_command_parses_as_written(monkeypatch, page, line, module, argv):
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        real(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    main = importlib.import_module(ENTRY.get(module, module)).main
    with pytest.raises(Parsed):
        try:
            main(argv)
        except SystemExit as e:
            if e.code in (0, None) and {"-h", "--help"} & set(argv):   # help printed: the flags exist
                raise Parsed from None
            pytest.fail(f"{page}: `{line}` does not parse (exit {e.code})")
