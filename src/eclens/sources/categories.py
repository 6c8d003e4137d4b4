"""The pair categories eclens generates, with the descriptions the LLM generator sends.

Each category names one kind of one-token change. The template generator writes
its own sentences for each; the LLM generator sends the description and examples
below as its instructions, so both sources mean the same thing by a category.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EclensError


@dataclass(frozen=True)
class Category:
    name: str
    description: str
    examples: tuple[tuple[str, str], ...]


CATEGORIES: dict[str, Category] = {c.name: c for c in (
    Category(
        "grammar/agreement",
        "subject-verb number agreement: the corrupt sentence uses a verb form whose number (singular/plural) "
        "does not match its subject; the clean sentence is grammatical",
        (("The keys to the cabinet are on the table.", "The keys to the cabinet is on the table."),
         ("My neighbor walks his dog every evening.", "My neighbor walk his dog every evening.")),
    ),
    Category(
        "grammar/tense",
        "verb tense: the corrupt sentence uses a verb form in the wrong tense or aspect for its context "
        "(a past-time adverb with a present verb, 'will' with a past form, 'has' with a simple past form)",
        (("Yesterday, Anna walked to the station.", "Yesterday, Anna walks to the station."),
         ("He has already eaten his lunch.", "He has already ate his lunch.")),
    ),
    Category(
        "grammar/article",
        "articles: the corrupt sentence uses the wrong indefinite article ('a' before a vowel sound, 'an' "
        "before a consonant sound, or 'a' before a plural noun)",
        (("She gave me an old book for my birthday.", "She gave me a old book for my birthday."),
         ("We bought some apples at the market.", "We bought a apples at the market.")),
    ),
    Category(
        "grammar/preposition",
        "prepositions: the corrupt sentence replaces the preposition a word requires with a wrong one",
        (("Lucy is interested in modern art.", "Lucy is interested on modern art."),
         ("The box is full of old letters.", "The box is full from old letters.")),
    ),
    Category(
        "grammar/anaphor",
        "reflexive pronouns: the corrupt sentence uses a reflexive (himself, herself, themselves) whose "
        "gender or number does not match its antecedent",
        (("John hurt himself while cooking.", "John hurt herself while cooking."),
         ("The children washed themselves before dinner.", "The children washed himself before dinner.")),
    ),
    Category(
        "typo",
        "typos: the corrupt sentence misspells one word (a dropped, doubled or swapped letter); the "
        "misspelt form must not be a real English word",
        (("We talked about the problem for an hour.", "We talked about the proble for an hour."),
         ("The doctor arrived late this morning.", "The doctr arrived late this morning.")),
    ),
    Category(
        "meaning/subject",
        "a different subject: both sentences are grammatical and natural; the subject noun or name is "
        "replaced by another of the same number, changing who does the action",
        (("The teacher opened the window because it was hot.", "The farmer opened the window because it was hot."),
         ("It was the baker who called the police.", "It was the pilot who called the police.")),
    ),
    Category(
        "meaning/location",
        "a different location: both sentences are grammatical and natural; a place noun is replaced by "
        "another place, changing where something happens",
        (("Anna left the keys in the kitchen last night.", "Anna left the keys in the garage last night."),
         ("We met at the station on Saturday.", "We met at the museum on Saturday.")),
    ),
    Category(
        "meaning/adjective",
        "a different adjective: both sentences are grammatical and natural; an adjective is replaced by "
        "another from the same scale (a colour, size, temperature, mood), changing the meaning",
        (("The soup was hot when it arrived.", "The soup was cold when it arrived."),
         ("Tom painted the old fence red last summer.", "Tom painted the old fence blue last summer.")),
    ),
)}


def resolve_categories(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """Known categories in canonical order; ``None`` means all. ``grammar`` selects every ``grammar/*``.

    Items may be comma-separated (``--categories typo,grammar``).
    """
    if not names:
        return list(CATEGORIES)
    wanted: list[str] = []
    for item in names:
        for name in (s.strip() for s in str(item).split(",")):
            if not name:
                continue
            hits = [c for c in CATEGORIES if c == name or c.startswith(name.rstrip("/") + "/")]
            if not hits:
                raise EclensError(f"unknown category {name!r}: choose from {', '.join(CATEGORIES)} "
                                  "(or a prefix such as 'grammar')")
            wanted.extend(h for h in hits if h not in wanted)
    if not wanted:
        raise EclensError("no categories given; leave --categories out for all of them")
    return [c for c in CATEGORIES if c in wanted]
