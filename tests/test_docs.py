"""The documentation site covers the public API, the examples and the CLI.

`mkdocs build --strict` (CI's docs step) fails on broken links and on
references to names that do not exist; these tests catch what it cannot:
a public name (in an `__all__` below) with no entry in the API reference, an
entry for a name that is no longer public, an example script without its
tutorial page, and a README whose two commands differ from the site's.
"""

import glob
import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
# Every module whose `__all__` is the public API the reference must cover.
PUBLIC_MODULES = (
    "tfp_glow",
    "tfp_glow.bijectors",
    "tfp_glow.nets",
    "tfp_glow.vi",
    "tfp_glow.training",
    "tfp_glow.data",
    "tfp_glow.npe",
)
# `::: name` at the start of a line: one mkdocstrings entry.
_ENTRY = re.compile(r"^:::\s+([\w.]+)\s*$", re.MULTILINE)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _reference_entries():
    """{entry: page} of every mkdocstrings entry in docs/reference/."""
    entries = {}
    for page in sorted(glob.glob(os.path.join(DOCS, "reference", "*.md"))):
        for name in _ENTRY.findall(_read(page)):
            entries.setdefault(name, os.path.relpath(page, ROOT))
    return entries


def _public_names():
    """Every public name as the reference spells it, e.g. `tfp_glow.bijectors.ActNorm`."""
    return {
        f"{module}.{name}"
        for module in PUBLIC_MODULES
        for name in importlib.import_module(module).__all__
    }


def test_every_public_name_has_a_reference_entry():
    entries = _reference_entries()
    missing = sorted(_public_names() - set(entries))
    assert not missing, (
        f"public names without an entry in docs/reference/*.md: {missing}. Add a line "
        f"'::: <name>' to the page of its module (docs/reference/<module>.md)."
    )


def test_every_reference_entry_is_a_public_name():
    # Entries by public name only (`::: tfp_glow.Glow`, not the module defining it):
    # modules move, public names stay. The modules' own pages document the modules.
    public = _public_names() | set(PUBLIC_MODULES)
    stale = {name: page for name, page in _reference_entries().items() if name not in public}
    assert not stale, f"reference entries that are not public names: {stale}"


def test_no_name_has_two_reference_entries():
    counts = {}
    for page in glob.glob(os.path.join(DOCS, "reference", "*.md")):
        for name in _ENTRY.findall(_read(page)):
            counts[name] = counts.get(name, 0) + 1
    assert {name for name, n in counts.items() if n > 1} == set()


def _examples():
    return sorted(
        os.path.splitext(os.path.basename(p))[0]
        for p in glob.glob(os.path.join(ROOT, "examples", "*.py"))
        if not os.path.basename(p).startswith("_")
    )


@pytest.mark.parametrize("example", _examples())
def test_every_example_is_a_tutorial_page_with_its_figures(example):
    page = os.path.join(DOCS, "tutorials", f"{example}.md")
    assert os.path.exists(page), f"examples/{example}.py has no page docs/tutorials/{example}.md"
    text = _read(page)
    # The page shows the script itself (pymdownx.snippets), not a copy that can drift.
    assert f'--8<-- "examples/{example}.py"' in text
    assert f"tutorials/{example}.md" in _read(os.path.join(ROOT, "mkdocs.yml"))
    figures = re.findall(r"!\[[^\]]*\]\(([^)\s]+\.png)\)", text)
    assert figures, f"docs/tutorials/{example}.md shows no figure"
    for figure in figures:
        path = os.path.normpath(os.path.join(DOCS, "tutorials", figure))
        assert path.startswith(os.path.join(DOCS, "tutorials", "figures", example) + os.sep)
        assert os.path.getsize(path) > 1000, path


def _bash_blocks(text):
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)]


def test_readme_and_getting_started_give_the_same_two_commands():
    readme = _bash_blocks(_read(os.path.join(ROOT, "README.md")))
    started = _bash_blocks(_read(os.path.join(DOCS, "getting-started.md")))
    train = 'pip install -e ".[examples]" && tfp-glow train'
    test = 'pip install -e ".[test]" && python -m pytest'
    for command in (train, test):
        assert command in readme and command in started, command


def test_every_guide_page_is_in_the_nav_or_added_by_the_hook():
    # docs/hooks.py appends guide pages missing from mkdocs.yml's nav; this
    # checks the hook's rule on the pages there now, without building the site.
    spec = importlib.util.spec_from_file_location("docs_hooks", os.path.join(DOCS, "hooks.py"))
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    nav = [{"Home": "index.md"}, {"User guide": [{"The tfp-glow command": "guide/cli.md"}]}]
    hooks.on_config({"nav": nav, "docs_dir": DOCS})
    guide = {next(iter(item.values())) for item in nav[1]["User guide"]}
    pages = glob.glob(os.path.join(DOCS, "guide", "*.md"))
    on_disk = {"guide/" + os.path.basename(p) for p in pages}
    assert guide == on_disk
    assert nav[1]["User guide"][0] == {"The tfp-glow command": "guide/cli.md"}


def _headline_rows(readme):
    """(link target, measured cell) of every row of README's headline table."""
    section = readme.split("## Headline figures", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        link = re.search(r"\]\(([^)#\s]+)", cells[0])
        if link:
            rows.append((link.group(1), cells[-1]))
    return rows


def test_readme_headline_figures_are_the_figures_of_the_pages_they_link():
    # One value per figure, wherever it appears: each decimal figure and each
    # "N min M s" time of a headline row is stated on the page its row links to.
    rows = _headline_rows(_read(os.path.join(ROOT, "README.md")))
    assert len(rows) >= 5
    for target, measured in rows:
        page = _read(os.path.join(ROOT, target))
        figures = re.findall(r"-?\d+\.\d+|\d+ min \d+ s", measured)
        assert figures, measured
        for figure in figures:
            assert figure in page, f"README's {figure} is not on {target}"


@pytest.mark.slow
def test_readme_fifteen_lines_run(tmp_path):
    # The README's example as written, at 1 epoch instead of 60 (seconds, not minutes).
    readme = _read(os.path.join(ROOT, "README.md"))
    code = re.search(r"## In fifteen lines.*?```python\n(.*?)```", readme, re.DOTALL).group(1)
    assert "epochs=60" in code
    code = code.replace("epochs=60", "epochs=1")
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    bits_per_dim = float(result.stdout.strip().splitlines()[-1])
    # One epoch, evaluated with the averaged weights (still 79% their init after
    # 23 steps at momentum 0.99) and an untrained dequantizer: 4.52 measured,
    # above the 60-epoch 2.12 and finite.
    assert 2.0 < bits_per_dim < 5.0, bits_per_dim
    assert os.path.getsize(tmp_path / "samples.png") > 1000
    assert os.path.exists(tmp_path / "export" / "1" / "saved_model.pb")


def test_published_text_names_no_issue_numbers():
    # README, BENCHMARKS and the site are read by people who cannot see the
    # project's issue tracker: "issue 14", "(issue 17, item 4)" mean nothing there.
    pages = [
        os.path.join(ROOT, "README.md"),
        os.path.join(ROOT, "BENCHMARKS.md"),
        os.path.join(ROOT, "CHANGELOG.md"),
    ]
    pages += glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True)
    pattern = re.compile(r"\bissue[- ]?#?\d+|(?<![&\w])#\d+\b", re.IGNORECASE)
    found = {os.path.relpath(p, ROOT): pattern.findall(_read(p)) for p in pages}
    assert {page: hits for page, hits in found.items() if hits} == {}
