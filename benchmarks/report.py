"""`print_and_write`: a benchmark's JSON result, printed and (with `--out`) saved."""

import json
import os


def print_and_write(result, out=None):
    """Prints `result` as indented JSON; writes the same text to `out` if given
    (creating its folder)."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
