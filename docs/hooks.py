"""MkDocs hooks of the documentation site (mkdocs.yml's `hooks:`).

* Every `docs/guide/*.md` page is in the user guide's nav: pages named in
  mkdocs.yml keep their place and title, any other guide page is appended
  (title: its first `# ` heading), so a new guide page needs no nav edit.
* `<!-- tfp-glow-cli-reference -->` in a page is replaced by the reference of
  the `tfp-glow` command, generated from `tfp_glow.cli_args.build_parser()`:
  the reference cannot drift from the flags the command accepts.
* `<!-- tfp-glow-readme -->` (the home page) is replaced by the repository's
  README.md, its links rewritten from the repository's layout to the site's
  (`docs/guide/cli.md` -> `guide/cli.md`, BENCHMARKS.md, CHANGELOG.md): the
  front page of the site and of the repository are one text.
"""

import argparse
import glob
import os

CLI_MARKER = "<!-- tfp-glow-cli-reference -->"
README_MARKER = "<!-- tfp-glow-readme -->"
# README link targets (repository paths) -> the site's pages, relative to docs/.
README_LINKS = (
    ("](docs/", "]("),
    ("](BENCHMARKS.md", "](results/benchmarks.md"),
    ("](CHANGELOG.md)", "](changelog.md)"),
)
GUIDE_SECTION = "User guide"


def _first_heading(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# "):
                return line[2:].strip()
    return os.path.splitext(os.path.basename(path))[0].replace("-", " ").capitalize()


def _nav_paths(items):
    """Every page path named anywhere in a nav (sub)tree."""
    for item in items:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            yield from _nav_paths(value)
        else:
            yield value


def on_config(config):
    nav = config["nav"]
    section = next(
        (item[GUIDE_SECTION] for item in nav if isinstance(item, dict) and GUIDE_SECTION in item),
        None,
    )
    if section is None:
        raise ValueError(f"mkdocs.yml's nav has no {GUIDE_SECTION!r} section for docs/guide/")
    listed = set(_nav_paths(nav))
    docs_dir = config["docs_dir"]
    for path in sorted(glob.glob(os.path.join(docs_dir, "guide", "*.md"))):
        page = os.path.relpath(path, docs_dir).replace(os.sep, "/")
        if page not in listed:
            section.append({_first_heading(path): page})
    return config


def _cell(text):
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _option_rows(parser):
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        invocation = formatter._format_action_invocation(action)
        help_text = formatter._expand_help(action) if action.help else ""
        if action.help is argparse.SUPPRESS:
            continue
        rows.append(f"| `{_cell(invocation)}` | {_cell(help_text)} |")
    return rows


def cli_reference_markdown():
    """Markdown for every subcommand of `tfp-glow`: usage, description, options."""
    # Fixed width: the usage lines must not depend on the terminal of the build.
    os.environ["COLUMNS"] = "100"
    from tfp_glow.cli_args import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {a.dest: a.help for a in sub._choices_actions}
    lines = ["```text", parser.format_usage().strip(), "```", ""]
    for name, subparser in sub.choices.items():
        lines += [f"## `{parser.prog} {name}`", ""]
        if subparser.description or summaries.get(name):
            lines += [subparser.description or summaries[name], ""]
        lines += ["```text", subparser.format_usage().strip(), "```", ""]
        rows = _option_rows(subparser)
        if rows:
            lines += ["| option | meaning |", "|---|---|", *rows, ""]
    return "\n".join(lines)


def readme_markdown(config):
    """README.md with its links pointing into the site (for docs/index.md)."""
    root = os.path.dirname(os.path.abspath(config["config_file_path"]))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for old, new in README_LINKS:
        text = text.replace(old, new)
    return text


def on_page_markdown(markdown, page, config, files):
    if README_MARKER in markdown:
        markdown = markdown.replace(README_MARKER, readme_markdown(config))
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference_markdown())
    return markdown
