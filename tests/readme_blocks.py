"""The README's fenced code blocks as a reader sees them, and how ``tests/test_readme.py`` runs one as pasted.

How a block runs:

- ``bash`` blocks run with ``bash -e -o pipefail -c BLOCK``, in a temporary folder, with ``fama`` and ``python`` on
  ``PATH`` being this checkout's command line and this interpreter, without the caller's ``FAMA_*`` variables, and
  with the variables the block needs prepared (``FAMA_PORT`` for ``fama serve``, ``FAMA_SHARED_DIR`` for recorded
  runs): the environment is prepared, the text is not changed...
- ...except for one rewrite, in ``bash`` and ``python`` blocks alike: the proxy's address ``localhost:8080`` or
  ``127.0.0.1:8080`` becomes the address of the proxy the test started on a free port (:func:`at_port`).
- Output blocks (``text``, ``json``) are compared with what the block before them really printed: ``...`` stands for
  any text within a line, and a line that is only ``...`` for any number of lines (:func:`shape_mismatch`).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_ADDRESS = re.compile(r"\b(?:localhost|127\.0\.0\.1):8080\b")


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # of the opening fence, 1-based

    @property
    def key(self) -> str:
        """The block's first non-blank line, stripped: how the tests name it."""
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    def where(self) -> str:
        return f"README.md line {self.line}: ```{self.lang} block starting {self.key!r}"


def readme_blocks(path: Path = README) -> list[Block]:
    """Every fenced or indented code block, also those inside list items."""
    blocks = []
    for token in MarkdownIt("commonmark").parse(path.read_text()):
        if token.type in ("fence", "code_block") and token.map is not None:
            blocks.append(
                Block(token.info.strip().split(" ")[0] if token.info else "", token.content, token.map[0] + 1)
            )
    return blocks


def at_port(text: str, port: int) -> str:
    """The block with the proxy's documented address replaced by the test proxy's."""
    return _ADDRESS.sub(f"127.0.0.1:{port}", text)


def shell_env(bin_dir: Path, **variables: str) -> dict[str, str]:
    """This environment without ``FAMA_*`` variables, with ``fama`` and ``python`` from this checkout first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    entry = "import sys; from proxy.cli import main; sys.argv[0] = 'fama'; main()"
    for name, args in (("fama", f'-c "{entry}" '), ("python", "")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" {args}"$@"\n')  # a venv's python, also from elsewhere
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAMA_")}
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(variables)
    return env


def run_bash(text: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", text], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def shape_mismatch(shown: str, printed: str) -> str | None:
    """None when ``printed`` has the shape the README shows (``...`` elides); else what differs."""
    pattern = ""
    for line in (line.strip() for line in shown.splitlines() if line.strip()):
        if line == "...":
            pattern += r"(?:[^\n]*\n)*?"
        else:
            pattern += "[^\n]*?".join(re.escape(part) for part in line.split("...")) + r"\n"
    lines = [line.strip() for line in printed.splitlines() if line.strip()]
    if re.fullmatch(pattern, "".join(f"{line}\n" for line in lines)):
        return None
    return "the output does not have the shape shown:\n" + shown + "\nprinted:\n" + "\n".join(lines)


def pip_targets(text: str) -> list[tuple[str, ...]]:
    """The arguments of every ``pip install`` in a shell block (``-e``/``--no-deps`` and such left out)."""
    targets = []
    for command in re.split(r"&&|;|\n", re.sub(r"\\\n", " ", text)):
        words = [w for w in shlex.split(command, comments=True) if not re.fullmatch(r"[A-Za-z_]\w*=.*", w)]
        if words[:2] == ["pip", "install"]:
            targets.append(tuple(w for w in words[2:] if not w.startswith("-")))
    return targets
