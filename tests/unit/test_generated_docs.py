"""Documentation generated from code stays equal to what the generator writes."""

from __future__ import annotations

import subprocess
import sys

from durable.options import OPTIONS, configuration_markdown
from tests.support.helpers import ROOT


def test_configuration_doc_is_generated_from_the_option_table() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text() == configuration_markdown()


def test_every_option_is_in_the_doc() -> None:
    text = configuration_markdown()
    for option in OPTIONS:
        assert f"`{option.env}`" in text
        if option.flag is not None:
            assert f"`{option.flag}`" in text


def test_gen_docs_check_passes_on_the_repository() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bin" / "gen-docs"), "--check"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
