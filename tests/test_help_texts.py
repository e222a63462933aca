"""Every option of every command (tests/entry_points.py, and each subcommand) says in its --help what happens
when it is not given, run as a user does: `python ... --help` in a fresh interpreter.

The rule, for each entry of the help's option and positional lists (-h/--help aside):
- a switch (an option that takes no value) is off unless given: argparse's store_true/store_false flags need no
  more (a switch whose field defaults to on shows that field's "config default: True", as the aliases do);
- an option or positional the command cannot run without is marked so by argparse itself: it appears outside
  [...] in the usage line;
- any other option, and a positional in [...], says what it is when not given: its help contains the word
  "default" ("(default: X)", "(config default: X)", "(default X)", "none by default"), or "required";
- where the option lists its choices ({a,b,c}), a "config default: X" it shows is one of them (or None).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from entry_points import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"^  (\S.*?)(?:\s{2,}(\S.*))?$")  # an entry's first line: names [metavar], maybe help
DEFAULT = re.compile(r"\b(default|required)\b", re.IGNORECASE)
CONFIG_DEFAULT = re.compile(r"config default: ([^;)\s]+)")


def help_text(argv: list) -> str:
    env = {**os.environ, "COLUMNS": "400"}  # one line per entry where it fits: entries parse plainly
    out = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip(), f"{argv} --help: exit {out.returncode}\n{out.stderr[-2000:]}"
    return out.stdout


def entries(text: str) -> list:
    """(section, names and metavar, help) of each entry of the "options:" and "positional arguments:" lists."""
    found, section = [], None
    for line in text.splitlines():
        if re.match(r"^\S.*:$", line):
            section = line[:-1] if line[:-1] in ("options", "positional arguments") else None
            continue
        if section is None or not line.strip():
            continue
        match = ENTRY.match(line)
        if match and not line.startswith("    "):
            found.append([section, match[1], match[2] or ""])
        elif found and line.startswith("    "):  # the help, or its continuation, on its own lines
            found[-1][2] = (found[-1][2] + " " + line.strip()).strip()
    return [tuple(e) for e in found]


def required_words(usage: str) -> set:
    """The words of the usage line outside [...] (nested brackets too): what the command needs."""
    previous = None
    while previous != usage:
        previous, usage = usage, re.sub(r"\[[^\[\]]*\]", " ", usage)
    return set(usage.replace(",", " ").split())


def usage_of(text: str) -> str:
    return text.split("\n\n", 1)[0]


def problems(name: str, text: str) -> list:
    needed = required_words(usage_of(text))
    out = []
    for section, names, helptext in entries(text):
        words = names.replace(",", " ").split()
        if "-h" in words or "--help" in words:
            continue
        if section == "options" and len(words) == len([w for w in words if w.startswith("-")]):
            continue  # a switch: off unless given
        if section == "options" and any(w.startswith("-") and w in needed for w in words):
            continue  # required by argparse
        if section == "positional arguments" and (words[0] in needed or words[0].startswith("{")):
            continue  # a positional the command needs, or the subcommand list
        if not DEFAULT.search(helptext):
            out.append(f"{name}: {names}: help says nothing of its default: {helptext!r}")
        choices = re.search(r"\{([^}]*)\}", names)
        for shown in CONFIG_DEFAULT.findall(helptext):
            if choices and shown != "None" and shown not in choices[1].split(","):
                out.append(f"{name}: {names}: config default {shown!r} is not among its choices")
    return out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_says_its_default(name):
    argv = COMMANDS[name]
    text = help_text(argv)
    found = problems(name, text)
    subcommands = re.search(r"\{([\w,-]+)\} \.\.\.", usage_of(text))
    for sub in subcommands[1].split(",") if subcommands else []:
        found += problems(f"{name} {sub}", help_text([*argv, sub]))
    assert not found, "\n".join(found)


def test_the_rule_catches_what_it_should():
    """The parser of help texts on a made-up one: each kind of entry, with and without its default."""
    text = """usage: x [-h] -o OUT [--a A] [--b B] [--c {p,q}] [--d {p,q}] [--flag] [--e E] [--f [F ...]] SRC [OPT]

options:
  -h, --help   show this help message and exit
  -o OUT       where to write
  --a A        the a (default: 3)
  --b B        the b
  --c {p,q}    the c (x.c; config default: r)
  --d {p,q}    the d (x.d; config default: p)
  --flag       a switch
  --e E        the e (required with --flag)
  --f [F ...]
               the f, none by default

positional arguments:
  SRC          the source
  OPT          an optional one
"""
    assert problems("x", text) == [
        "x: --b B: help says nothing of its default: 'the b'",
        "x: --c {p,q}: config default 'r' is not among its choices",
        "x: OPT: help says nothing of its default: 'an optional one'",
    ]
