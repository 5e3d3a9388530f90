"""The configuration table of docs/operations.md, from `service.config.Settings`.

    python -m scripts.config_table           # print it
    python -m scripts.config_table --write   # rewrite its block in docs/operations.md (make docs)
"""

import sys
from dataclasses import fields

from scripts import docs_blocks
from service.config import ENV_PREFIX, Settings

DOC = docs_blocks.ROOT / "docs" / "operations.md"
SCRIPT = "scripts.config_table"


def table() -> str:
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in fields(Settings):
        default = f.default if f.default != "" else '""'
        rows.append(
            f"| `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | `{default}` | {f.metadata['help']} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        changed = docs_blocks.write(DOC, SCRIPT, table())
        print(f"{DOC.relative_to(docs_blocks.ROOT)}: {'updated' if changed else 'up to date'}")
    else:
        print(table())
