"""Real text-classification tasks built only from locally packaged data.

Sources (nothing is downloaded at run time):
  wn_noun   WordNet noun supersense from the synset gloss   Debian `wordnet-base`
  wn_verb   WordNet verb supersense from the synset gloss   Debian `wordnet-base`
  topic     topic of a fortune cookie                       Debian `fortunes`, `fortunes-min`
  polarity  positive / negative word                        PyPI `vaderSentiment` lexicon
  langid    language of a chatbot utterance                 PyPI `chatterbot-corpus`

Each task is split once, with a fixed seed, into disjoint test / val / train
sets.  Training sets deliberately have very different sizes (5000 .. 150).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNE_DIR = Path("/usr/share/games/fortunes")
SPLIT_SEED = 1234

# lexicographer file numbers -> names (WordNet lexnames(5WN))
LEXNAMES = {
    3: "Tops",
    4: "act",
    5: "animal",
    6: "artifact",
    7: "attribute",
    8: "body",
    9: "cognition",
    10: "communication",
    11: "event",
    12: "feeling",
    13: "food",
    14: "group",
    15: "location",
    16: "motive",
    17: "object",
    18: "person",
    19: "phenomenon",
    20: "plant",
    21: "possession",
    22: "process",
    23: "quantity",
    24: "relation",
    25: "shape",
    26: "state",
    27: "substance",
    28: "time",
    29: "body",
    30: "change",
    31: "cognition",
    32: "communication",
    33: "competition",
    34: "consumption",
    35: "contact",
    36: "creation",
    37: "emotion",
    38: "motion",
    39: "perception",
    40: "possession",
    41: "social",
    42: "stative",
    43: "weather",
}
FORTUNE_TOPICS = ["computers", "politics", "science", "songs-poems", "work", "law", "food", "education"]
LANGUAGES = ["english", "spanish", "italian", "portuguese", "dutch", "indonesian", "turkish", "german"]

# name -> (train size, val size, max test size)
SIZES = {
    "wn_noun": (5000, 500, 2000),
    "topic": (1500, 400, 2000),
    "wn_verb": (600, 400, 2000),
    "polarity": (300, 400, 2000),
    "langid": (150, 150, 2000),
}


@dataclass
class Task:
    name: str
    labels: list[str]
    train: list[tuple[str, int]] = field(default_factory=list)
    val: list[tuple[str, int]] = field(default_factory=list)
    test: list[tuple[str, int]] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------- raw data
def _wordnet(pos: str, min_count: int = 200) -> list[tuple[str, str]]:
    """(gloss without example sentences, supersense) for every synset."""
    rows = []
    for line in (WORDNET_DIR / f"data.{pos}").read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # licence header
        lexfile = int(line.split()[1])
        gloss = line.split("|", 1)[1].strip()
        gloss = gloss.split('; "')[0].strip().strip('"').strip()
        if gloss:
            rows.append((gloss, LEXNAMES[lexfile]))
    return _drop_rare(rows, min_count)


def _fortunes() -> list[tuple[str, str]]:
    rows = []
    for topic in FORTUNE_TOPICS:
        text = (FORTUNE_DIR / topic).read_text(encoding="utf-8", errors="replace")
        for item in text.split("\n%\n"):
            item = " ".join(item.replace("%", " ").split())
            if len(item) >= 20:
                rows.append((item[:300], topic))
    return rows


def _vader(min_abs: float = 0.5) -> list[tuple[str, str]]:
    import vaderSentiment

    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        word, mean = line.split("\t")[:2]
        if re.fullmatch(r"[a-z][a-z'-]+", word) and abs(float(mean)) >= min_abs:
            rows.append((word, "positive" if float(mean) > 0 else "negative"))
    return rows


def _chatterbot(per_language: int = 320) -> list[tuple[str, str]]:
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data"
    seen: dict[str, set[str]] = {}
    for lang in LANGUAGES:
        for path in sorted((root / lang).glob("*.yml")):
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for conv in data.get("conversations") or []:
                for text in conv if isinstance(conv, list) else [conv]:
                    text = " ".join(str(text).split())
                    if len(text.split()) >= 2:
                        seen.setdefault(text, set()).add(lang)
    by_lang: dict[str, list[str]] = {lang: [] for lang in LANGUAGES}
    for text, langs in seen.items():
        if len(langs) == 1:  # drop strings shared between languages
            by_lang[next(iter(langs))].append(text)
    rng = random.Random(SPLIT_SEED)
    rows = []
    for lang in LANGUAGES:
        texts = sorted(by_lang[lang])
        rng.shuffle(texts)
        rows += [(t, lang) for t in texts[:per_language]]
    return rows


def _drop_rare(rows, min_count):
    counts: dict[str, int] = {}
    for _, label in rows:
        counts[label] = counts.get(label, 0) + 1
    return [(t, y) for t, y in rows if counts[y] >= min_count]


RAW = {
    "wn_noun": lambda: _wordnet("noun"),
    "wn_verb": lambda: _wordnet("verb"),
    "topic": _fortunes,
    "polarity": _vader,
    "langid": _chatterbot,
}
TASK_NAMES = list(SIZES)


# ---------------------------------------------------------------- splitting
@functools.cache
def load_task(name: str, scale: float = 1.0) -> Task:
    """Deterministic test / val / train split; `scale` < 1 shrinks every split (smoke mode).
    Memoized (parsing the sources takes seconds and run.py asks for every task several
    times); callers must not modify the returned Task."""
    rows = RAW[name]()
    # one example per distinct text (first label wins), then a seeded shuffle
    dedup = {}
    for text, label in rows:
        dedup.setdefault(text, label)
    rows = sorted(dedup.items())
    random.Random(SPLIT_SEED).shuffle(rows)
    labels = sorted({y for _, y in rows})
    index = {y: i for i, y in enumerate(labels)}
    rows = [(t, index[y]) for t, y in rows]

    n_train, n_val, n_test = SIZES[name]
    n_train, n_val = max(8, int(n_train * scale)), max(8, int(n_val * scale))
    n_test = min(int(n_test * scale), len(rows) - n_train - n_val)
    if n_test < 0.5 * SIZES[name][2] * scale:
        raise RuntimeError(f"{name}: only {len(rows)} examples")
    test = rows[:n_test]
    val = rows[n_test : n_test + n_val]
    train = rows[n_test + n_val : n_test + n_val + n_train]
    return Task(name, labels, train, val, test)


def load_tasks(names=None, scale: float = 1.0) -> dict[str, Task]:
    return {n: load_task(n, float(scale)) for n in (names or TASK_NAMES)}


if __name__ == "__main__":
    for task in load_tasks().values():
        print(
            f"{task.name:9s} labels={task.num_labels:2d} train={len(task.train):5d} "
            f"val={len(task.val):4d} test={len(task.test):5d}  e.g. {task.train[0]}"
        )
