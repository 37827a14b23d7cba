"""Write docs/api.md and docs/cli.md from the docstrings and the argument parser.

Run after changing a public docstring or a command-line option:
    python scripts/gen_reference.py
The test suite fails when the committed pages differ from what this script writes.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def api_page() -> str:
    import irm_lens

    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `scripts/gen_reference.py`; every name below is "
        "importable from `irm_lens`.",
        "",
    ]
    for name in sorted(irm_lens.__all__, key=str.lower):
        obj = getattr(irm_lens, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            lines += [f"## `{name}`", "", f"A constant: `{obj!r}`." if not isinstance(obj, dict)
                      else f"A mapping with keys {sorted(obj)}.", ""]
            continue
        kind = "class" if inspect.isclass(obj) else "function"
        try:
            signature = str(inspect.signature(obj))
        except (TypeError, ValueError):
            signature = "(...)"
        doc = inspect.getdoc(obj) or "(no docstring)"
        lines += [f"## `{name}`", "", f"{kind} `{name}{signature}`", "", "```text", doc, "```", ""]
    return "\n".join(lines)


def cli_page() -> str:
    from irm_lens.cli import build_parser

    parser = build_parser()
    parser.prog = "irm-lens"
    lines = [
        "# Command line",
        "",
        "Generated from the argument parser by `scripts/gen_reference.py`. `irm-lens` and "
        "`python -m irm_lens` are the same program. Errors print one line starting with "
        "`irm-lens: error:` and exit with status 2.",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
        "",
    ]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, command in sub.choices.items():
        command.prog = f"irm-lens {name}"
        lines += [f"## `irm-lens {name}`", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


PAGES = {"docs/api.md": api_page, "docs/cli.md": cli_page}


def main() -> int:
    import os

    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal width
    for relative, build in PAGES.items():
        (ROOT / relative).write_text(build())
        print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
