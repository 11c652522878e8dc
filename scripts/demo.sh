#!/usr/bin/env bash
# Install everything, then answer a question over a 2.7 MB document on the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
QUERY="According to the book-keeper's note in the margin of the prompt-book, where was the company's strongbox hidden?"
echo "\$ rlmflow run --context examples/data/shakespeare_plays.txt --query \"$QUERY\"" >&2
exec .venv/bin/rlmflow run --context examples/data/shakespeare_plays.txt --query "$QUERY" --max-turns 6 "$@"
