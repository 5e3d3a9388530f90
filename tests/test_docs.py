"""The README stays true to the code it documents."""

from pathlib import Path

from scripts.config_table import table

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_configuration_table_matches_settings() -> None:
    assert table() in README, "regenerate with: python scripts/config_table.py"
