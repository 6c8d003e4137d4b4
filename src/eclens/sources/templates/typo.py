"""typo: one word misspelt in each of the five ways, with a twin.

Each cluster puts a common word in a frame, misspells it by one kind (the kinds
cycle, so each gets a fifth), and makes a twin from the same frame: the word's
British/American spelling variant where there is one (neutral), else another word
of its class (acceptable). A misspelling is never a real word (codespell's list of
corrections is the dictionary). A deletion at the end of the word leaves a prefix
of the word, which is only an error once the next word shows the word has ended:
there ``detect`` is the next word. Split misspellings always add a token: they are
span pairs (``align(..., mode="span")``).
"""

from __future__ import annotations

import random

from ..typos import KINDS, misspell
from .frames import NAMES, Cluster, error_and_twin

NOUNS = ("apple", "orange", "cheese", "horse", "bird", "chair", "phone", "radio", "floor", "grass", "cream",
         "storm", "forest", "street", "office", "school", "doctor", "garden", "window", "river", "problem", "price",
         "month", "story", "reason", "meaning", "service", "theory", "purpose", "memory", "member", "figure",
         "sample", "income", "survey", "secret", "number", "schedule", "category", "decade", "parent", "colour",
         "theatre", "neighbour", "centre", "flavour", "jewellery", "programme", "harbour", "catalogue", "favour")
ADJECTIVES = ("large", "happy", "simple", "clear", "strange", "smooth", "remote", "false", "tough", "strict",
              "proud", "unique", "green", "grey", "quiet", "gentle", "modern", "famous", "honest", "little")
VERBS = ("explain", "describe", "imagine", "predict", "determine", "recall", "remember", "understand", "consider",
         "organise", "analyse", "realise", "recognise", "discuss", "mention")
TIMES = ("this morning", "last week", "yesterday", "after lunch", "on Monday", "")
NOUN_FRAMES = ("We talked about the {X} for almost an hour.", "Nobody at the meeting mentioned the {X} again.",
               "{N} wrote a short note about the {X} and left it on the desk.",
               "The {X} was the first thing {N} noticed {T}.", "{N} asked me about the {X} {T}.",
               "There was something odd about the {X}, but nobody could say what.")
ADJ_FRAMES = ("It was a very {X} day, as far as I remember.", "Everyone agreed that the plan was {X}.",
              "{N} said the house looked {X} {T}.", "The {X} old man waved at us from the garden.")
VERB_FRAMES = ("It was hard to {X} what happened next.", "Nobody could {X} what {N} had seen {T}.",
               "{N} tried to {X} the idea to the whole class.")


def typo(rng: random.Random, kind_index: int, prefer=None) -> Cluster | None:
    """The cluster for one draw; ``kind_index`` picks the kind (cycled by the caller), ``prefer(w)`` favours
    misspellings that pass it (one token under the target tokenizer)."""
    from ..codespell import real_words, spelling_variants  # here: codespell's module imports this package

    kind = KINDS[kind_index % len(KINDS)]
    cls = rng.choices(("noun", "adj", "verb"), weights=(5, 3, 2))[0]
    words, frames = {"noun": (NOUNS, NOUN_FRAMES), "adj": (ADJECTIVES, ADJ_FRAMES),
                     "verb": (VERBS, VERB_FRAMES)}[cls]
    word = rng.choice(words)
    bad = misspell(rng, word, kind, real_words(), prefer=(lambda w: prefer(" " + w)) if prefer else None)
    if bad is None:
        return None
    variants = spelling_variants()
    if word in variants:
        twin, twin_kind = variants[word], "neutral"
    else:
        twin, twin_kind = rng.choice([w for w in words if w != word and w not in variants]), "acceptable"
    i = rng.randrange(len(frames))
    # A dropped last letter leaves the start of the word: not yet an error until the next word.
    detect = "X+1" if word.startswith(bad) else None
    vs = error_and_twin(frames[i], (word, bad, twin), twin_kind=twin_kind, detect=detect, typo_kind=kind,
                        N=rng.choice(NAMES), T=rng.choice(TIMES))
    return Cluster(f"typo/{cls}_{i}", word, vs)
