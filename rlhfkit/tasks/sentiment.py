"""`sentiment`: continue a review opening; the gold reward likes positive, well-formed text.

Prompt: a review opening such as "the movie was" or "i watched this film and the plot was"
(13 templates x 8 nouns / 14 aspects = 440 distinct prompts). Response: a short
continuation of 4-15 whitespace-separated tokens ending with " .", e.g.
" really great and the music was boring ." Demonstrations are balanced: each has a
mood (positive 30%, negative 30%, neutral 20%, mixed 20%), symmetric between positive
and negative, so the mean gold reward of the demos is about 0 and there is room to
raise it up to about 1.
"""

from __future__ import annotations

import math
import random

from rlhfkit.tasks.base import Task

NOUNS = ["movie", "film", "show", "series", "documentary", "sequel", "cartoon", "play"]
ASPECTS = [
    "acting", "story", "plot", "music", "ending", "dialogue", "cast",
    "pacing", "script", "soundtrack", "hero", "humor", "direction", "editing",
]
TEMPLATES_N = [
    "the {n} was",
    "this {n} was",
    "i thought the {n} was",
    "to be honest the {n} was",
    "my friend said the {n} was",
    "i watched the {n} last night and it was",
]
TEMPLATES_A = [
    "overall the {a} felt",
    "the {a} was",
    "i found the {a}",
    "the {a} in this one was",
]
TEMPLATES_NA = [
    "i watched this {n} and the {a} was",
    "the {a} of the {n} was",
    "in this {n} the {a} was",
]

POS_ADJ = [
    "great", "good", "wonderful", "amazing", "brilliant", "excellent", "fantastic", "superb",
    "lovely", "beautiful", "fun", "enjoyable", "charming", "delightful", "moving", "clever",
    "fresh", "solid", "strong", "perfect",
]
NEG_ADJ = [
    "bad", "terrible", "awful", "boring", "dull", "weak", "poor", "horrible", "messy", "bland",
    "silly", "painful", "forgettable", "lazy", "clumsy", "flat", "tedious", "annoying", "stupid", "ugly",
]
NEU_ADJ = [
    "okay", "fine", "long", "short", "simple", "typical", "normal", "quiet", "loud", "different",
    "familiar", "ordinary", "standard", "mixed", "unusual", "calm",
]
POS_VERB = ["loved", "enjoyed", "liked", "adored"]
NEG_VERB = ["hated", "disliked", "regretted", "resented"]
NEU_VERB = ["watched", "finished", "saw", "remember"]
POS_NOUN = ["gem", "treat", "masterpiece", "joy"]
NEG_NOUN = ["mess", "waste", "disaster", "letdown"]
INTENSIFIERS = ["very", "really", "quite", "so", "truly", "rather", "pretty", "extremely"]
FILLERS = [
    "i think", "to be honest", "in the end", "for the most part", "if you ask me",
    "at least for me", "most of the time", "as expected",
]

POSITIVE = frozenset(POS_ADJ + POS_VERB + POS_NOUN)
NEGATIVE = frozenset(NEG_ADJ + NEG_VERB + NEG_NOUN)

_ADJ = {"pos": POS_ADJ, "neg": NEG_ADJ, "neu": NEU_ADJ}
_VERB = {"pos": POS_VERB, "neg": NEG_VERB, "neu": NEU_VERB}
_NOUN = {"pos": POS_NOUN, "neg": NEG_NOUN}
# mood -> probabilities of (pos, neg, neu) for each clause; symmetric in pos/neg.
MOODS = {
    "positive": (0.75, 0.0, 0.25),
    "negative": (0.0, 0.75, 0.25),
    "neutral": (0.1, 0.1, 0.8),
    "mixed": (0.45, 0.45, 0.1),
}
MOOD_WEIGHTS = {"positive": 0.3, "negative": 0.3, "neutral": 0.2, "mixed": 0.2}

MIN_WORDS, MAX_WORDS = 4, 15  # demonstrations, counting "," and "."
DEGENERATE_WORDS = 20  # gold: longer than this is degenerate


def _all_prompts() -> list[str]:
    out = [t.format(n=n) for t in TEMPLATES_N for n in NOUNS]
    out += [t.format(a=a) for t in TEMPLATES_A for a in ASPECTS]
    out += [t.format(n=n, a=a) for t in TEMPLATES_NA for n in NOUNS for a in ASPECTS]
    return list(dict.fromkeys(out))


PROMPTS = _all_prompts()
VOCAB = frozenset(
    w
    for text in (
        PROMPTS + NOUNS + ASPECTS + POS_ADJ + NEG_ADJ + NEU_ADJ + POS_VERB + NEG_VERB + NEU_VERB
        + POS_NOUN + NEG_NOUN + INTENSIFIERS + FILLERS
        + ["and but so yet while , . i it was a real the this one"]
    )
    for w in text.split()
)


class SentimentTask(Task):
    """Positive-review continuation. Gold reward (response split on whitespace into words):

        P, N = number of words in POSITIVE, NEGATIVE (every occurrence counts)
        gold = tanh((P - N) / 2)                      # sentiment, in (-1, 1)
               - 1.0  if not ended with EOS
               - 0.5  if the last word is not "."     # also for an empty response
               - 1.0  if degenerate: empty, any word outside VOCAB, the same word 3+
                      times in a row, or more than 20 words

    So a clean response scores in (-1, 1): P - N = 1 -> 0.46, 2 -> 0.76, 3 -> 0.91.
    The prompt does not enter the score.
    """

    name = "sentiment"
    description = (
        "Continue a movie-review opening (e.g. 'the movie was'); gold reward = "
        "tanh((#positive - #negative words) / 2) minus penalties for no EOS (1.0), "
        "no final '.' (0.5) and degenerate text (1.0)."
    )
    label_temperature = 0.3
    unpaired_baseline = 0.0

    def all_prompts(self) -> list[str]:
        return PROMPTS

    # ---- generation ---------------------------------------------------------------------
    @staticmethod
    def _adj_phrase(rng: random.Random, pol: str) -> list[str]:
        words = [rng.choice(INTENSIFIERS)] if rng.random() < 0.3 else []
        return words + [rng.choice(_ADJ[pol])]

    def _clause(self, rng: random.Random, pol: str) -> list[str]:
        """A continuation clause with polarity pol in {pos, neg, neu}."""
        options = ["aspect", "verb", "it_was"]
        if pol == "neu":
            options.append("filler")
        else:
            options.append("noun")
        kind = rng.choice(options)
        if kind == "aspect":
            return [rng.choice(["and", "but", "while"]), "the", rng.choice(ASPECTS), "was"] + self._adj_phrase(
                rng, pol
            )
        if kind == "verb":
            return [",", "i", rng.choice(_VERB[pol]), "it"]
        if kind == "it_was":
            return [rng.choice(["and", "but", "so", "yet"]), "it", "was"] + self._adj_phrase(rng, pol)
        if kind == "filler":
            return [","] + rng.choice(FILLERS).split()
        return [",", "a", "real", rng.choice(_NOUN[pol])]

    def demo(self, rng: random.Random, prompt: str) -> str:
        mood = rng.choices(list(MOOD_WEIGHTS), weights=list(MOOD_WEIGHTS.values()))[0]
        probs = MOODS[mood]
        for _ in range(100):
            n_clauses = rng.choice([2, 2, 3])
            pols = rng.choices(["pos", "neg", "neu"], weights=probs, k=n_clauses)
            words = self._adj_phrase(rng, pols[0])
            for pol in pols[1:]:
                words += self._clause(rng, pol)
            words.append(".")
            if MIN_WORDS <= len(words) <= MAX_WORDS:
                return " " + " ".join(words)
        raise RuntimeError("could not sample a demonstration of the right length")  # pragma: no cover

    def rough(self, rng: random.Random, prompt: str) -> str:
        """A demo damaged one way: no final '.', a word repeated 3x, overlong, or cut short."""
        words = self.demo(rng, prompt).split()
        how = rng.choice(["no_period", "repeat", "overlong", "cut"])
        if how == "no_period":
            words = words[:-1]
        elif how == "repeat":
            i = rng.randrange(len(words) - 1)
            words = words[: i + 1] + [words[i]] * 2 + words[i + 1 :]
        elif how == "overlong":
            while len(words) <= DEGENERATE_WORDS:
                words = words[:-1] + self._clause(rng, rng.choice(["pos", "neg", "neu"])) + ["."]
        else:
            words = words[: rng.randint(1, max(1, len(words) - 2))]
        return " " + " ".join(words)

    # ---- gold reward --------------------------------------------------------------------
    def score(self, prompt: str, response: str, ended: bool = True) -> float:
        words = response.split()
        pos = sum(w in POSITIVE for w in words)
        neg = sum(w in NEGATIVE for w in words)
        gold = math.tanh((pos - neg) / 2.0)
        if not ended:
            gold -= 1.0
        if not words or words[-1] != ".":
            gold -= 0.5
        if is_degenerate(words):
            gold -= 1.0
        return gold


def is_degenerate(words: list[str]) -> bool:
    """Empty, out of vocabulary, a word 3+ times in a row, or more than 20 words."""
    if not words or len(words) > DEGENERATE_WORDS:
        return True
    if any(w not in VOCAB for w in words):
        return True
    return any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2))
