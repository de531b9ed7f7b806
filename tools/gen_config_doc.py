"""Write docs/config.md from the dataclasses in icpo/config/schema.py (tests/test_cli_fast.py
fails when the file is out of date).

    python tools/gen_config_doc.py
"""

from pathlib import Path

from icpo.config.doc import markdown

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    path.write_text(markdown(), encoding="utf-8")
    print(f"wrote {path}")
