"""Print the README's configuration table from `service.config.Settings`."""

from dataclasses import fields

from service.config import ENV_PREFIX, Settings


def table() -> str:
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in fields(Settings):
        default = f.default if f.default != "" else '""'
        rows.append(
            f"| `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | `{default}` | {f.metadata['help']} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
