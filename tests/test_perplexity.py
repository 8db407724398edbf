import json
from pathlib import Path

import pytest

from model.perplexity import HELDOUT, heldout_texts

HH = Path(__file__).resolve().parent / "data" / "hh_harmless_sample.jsonl"


def test_heldout_text_is_the_hh_sample_it_was_measured_on():
    """model/data holds the first 12 chosen dialogues of the HH sample: the README's figures still apply."""
    assert HELDOUT.parent.name == "data" and HELDOUT.parent.parent.name == "model"
    rows = [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert heldout_texts() == [r["chosen"] for r in rows[:12]]
    assert heldout_texts(4) == heldout_texts()[:4]
    with pytest.raises(ValueError, match="holds 12 texts, 13 asked for"):
        heldout_texts(13)
