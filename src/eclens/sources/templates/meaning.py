"""meaning/subject, meaning/location and meaning/adjective: acceptable changes of one word.

These pairs are not errors and have no twins; each frame gives one pair (its own
cluster), and which of the two words is the clean one is drawn at random, so the
swap direction (alphabetical order up or down) balances.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .frames import NAMES, Cluster, one_change, ordered, two

# --------------------------------------------------------------------- meaning/subject

SUBJ_PEOPLE = ("teacher", "doctor", "farmer", "student", "driver", "nurse", "waiter", "baker", "pilot", "lawyer",
               "manager", "neighbor", "soldier", "singer", "writer", "judge", "chef", "guard", "priest", "coach",
               "tourist", "painter", "dancer", "officer", "clerk")
SUBJ_PEOPLE_PL = tuple(p + "s" for p in SUBJ_PEOPLE)
SUBJ_VPS = ("opened the window", "closed the door quietly", "bought fresh bread at the market", "called the police",
            "found the missing keys", "fixed the old bicycle", "read the letter twice", "ate the last apple",
            "paid for the coffee", "won the race", "left the party early", "broke the vase", "sang a song",
            "lost the map", "answered the phone", "cleaned the kitchen", "locked the gate", "painted the fence",
            "fed the cat", "missed the bus", "told a long story", "laughed at the joke", "planted a tree",
            "knocked on the door", "cooked dinner for everyone")
SUBJ_TAILS = ("", "this morning", "before anyone else", "without saying a word", "after lunch", "again")
SUBJ_FRONT = ("Yesterday", "On Monday morning", "Late at night", "Without warning", "Just before noon",
              "After the concert", "Before the guests arrived")
SUBJ_ADJ = ("old", "young", "new", "tired", "tall")


def meaning_subject(rng: random.Random) -> Cluster:
    vp = rng.choice(SUBJ_VPS)
    tail = rng.choice(SUBJ_TAILS)
    r = rng.random()
    if r < 0.2:  # two names
        pair = two(rng, NAMES)
        frame = rng.choice(("Of course {X} {VP} {T}.", "{F}, {X} {VP}.", "I heard that {X} {VP} {T}.",
                            "Everyone was surprised when {X} {VP}."))
        return Cluster("subject/name", vp.split()[0], one_change(frame, pair, ordered(*pair), VP=vp, T=tail,
                                                                   F=rng.choice(SUBJ_FRONT)))
    plural = r < 0.4
    pair = two(rng, SUBJ_PEOPLE_PL if plural else SUBJ_PEOPLE)
    frames = (("simple", "The {X} {VP} {T}."), ("fronted", "{F}, the {X} {VP}."), ("cleft", "It was the {X} who {VP}."),
              ("heard", "I heard that the {X} {VP} {T}."), ("surprised", "Everyone was surprised when the {X} {VP}."),
              ("said", "{N} said that the {X} {VP}."), ("adjective", "The {A} {X} {VP} {T}."))
    tid, frame = rng.choice(frames)
    return Cluster(f"subject/{'plural_' if plural else ''}{tid}", vp.split()[0],
                   one_change(frame, pair, ordered(*pair), VP=vp, T=tail, F=rng.choice(SUBJ_FRONT),
                              N=rng.choice(NAMES), A=rng.choice(SUBJ_ADJ)))


# -------------------------------------------------------------------- meaning/location

LOC_ROOMS = ("kitchen", "garden", "bedroom", "bathroom", "hallway", "garage", "attic", "basement", "office",
             "classroom", "library", "cellar", "car", "shed", "studio")
LOC_PLACES = ("station", "airport", "museum", "hospital", "market", "bank", "park", "church", "stadium", "harbor",
              "school", "hotel", "library", "theater", "cinema", "bakery", "bridge", "beach", "zoo", "castle",
              "factory", "pharmacy", "gym")
LOC_SETTLEMENTS = ("village", "town", "house", "cottage", "port", "city")
LOC_OBJECTS = ("keys", "umbrella", "letters", "books", "bag", "tickets", "glasses", "wallet")
LOC_ROOM_FRAMES = ("{N} left the {O} in the {X} {T}.", "In the {X}, {N} found an old photo of the family.",
                   "The children were playing in the {X} when the storm began.",
                   "{N} spent the whole afternoon in the {X}, reading old letters.",
                   "The police searched the {X} but found nothing.", "We painted the {X} white last spring.")
LOC_PLACE_FRAMES = ("We met {N} at the {X} on Saturday.", "{N} waited outside the {X} for almost an hour.",
                    "There is a small cafe near the {X} where we often have lunch.",
                    "They decided to walk to the {X} instead of taking the bus.",
                    "The meeting will take place at the {X} next week.",
                    "I saw your brother near the {X} {T}.", "{N} works at the {X} in the centre of town.")
LOC_SETTLEMENT_FRAMES = ("My grandmother grew up in a small {X} by the sea.",
                         "{N} moved to a quiet {X} in the north after the war.")
LOC_TAILS = ("last night", "before going to work", "again", "by mistake", "this afternoon", "")


def meaning_location(rng: random.Random) -> Cluster:
    cls = rng.choices(("room", "place", "settlement"), weights=(5, 6, 1))[0]
    words, frames = {"room": (LOC_ROOMS, LOC_ROOM_FRAMES), "place": (LOC_PLACES, LOC_PLACE_FRAMES),
                     "settlement": (LOC_SETTLEMENTS, LOC_SETTLEMENT_FRAMES)}[cls]
    i = rng.randrange(len(frames))
    pair = two(rng, words)
    return Cluster(f"location/{cls}_{i}", f"{cls}_{i}", one_change(frames[i], pair, ordered(*pair), N=rng.choice(NAMES),
                                        O=rng.choice(LOC_OBJECTS), T=rng.choice(LOC_TAILS)))


# ------------------------------------------------------------------- meaning/adjective

ADJ_SCALES = {
    "colour": (("red", "blue", "green", "black", "white", "yellow", "brown", "grey", "pink"),
               ("car", "dress", "door", "shirt", "bike", "house", "hat", "jacket", "fence", "scarf", "boat")),
    "size": (("big", "small", "tiny", "huge", "large"), ("dog", "box", "house", "room", "garden", "bag", "tree")),
    "temperature": (("hot", "cold", "warm", "cool"), ("soup", "tea", "water", "room", "bath", "coffee")),
    "age": (("old", "new"), ("car", "house", "bike", "phone", "bridge", "computer", "piano")),
    "taste": (("sweet", "sour", "bitter", "salty"), ("cake", "soup", "sauce", "coffee", "lemonade", "fruit")),
    "speed": (("fast", "slow"), ("train", "car", "horse", "boat", "computer")),
    "light": (("dark", "bright"), ("room", "hallway", "sky", "street", "kitchen")),
    "difficulty": (("easy", "difficult", "hard"), ("exam", "question", "test", "task", "puzzle")),
    "loudness": (("loud", "quiet"), ("music", "room", "street", "party", "engine")),
    "length": (("long", "short"), ("film", "meeting", "story", "road", "speech", "queue")),
    "weight": (("heavy", "light"), ("box", "bag", "suitcase", "table", "coat")),
    "price": (("cheap", "expensive"), ("hotel", "ticket", "meal", "watch", "phone")),
}
ADJ_OBJECT_SCALES = ("colour", "size", "age", "weight", "price")
# Near-synonyms on a scale: never swapped for each other, so every pair changes the meaning.
ADJ_SYNONYMS = ({"big", "large", "huge"}, {"small", "tiny"}, {"hot", "warm"}, {"cold", "cool"},
                {"difficult", "hard"}, {"tired", "bored"}, {"nervous", "worried"})
ADJ_MOODS = ("happy", "sad", "angry", "calm", "nervous", "tired", "bored", "excited", "worried")
ADJ_PREDICATE_FRAMES = ("The {NO} was {X}, just as {N} had said.", "Everyone said the {NO} was too {X}.",
                        "I thought the {NO} would be {X}, but I was wrong.",
                        "{N} complained that the {NO} was too {X} {T}.")
ADJ_ATTRIBUTIVE_FRAMES = ("{N} talked about the {X} {NO} for hours.", "I still remember the {X} {NO} from that summer.",
                          "{N} pointed at the {X} {NO} and smiled.",
                          "We took a photo of the {X} {NO} before we left.")
ADJ_OBJECT_FRAMES = ("{N} could not find the {X} {NO} anywhere.", "The {X} {NO} in the corner belongs to {N}.")
ADJ_MOOD_FRAMES = ("{N} felt {X} after the long meeting.", "{N} looked {X} when the phone rang.",
                   "The children seemed {X} all afternoon.", "Why is {N} so {X} today?",
                   "After the call, {N} was {X} for the rest of the day.")
ADJ_TAILS = ("", "this time", "again")


def _contrast(rng: random.Random, adjs: Sequence[str]) -> tuple[str, str]:
    while True:
        a, b = two(rng, adjs)
        if not any(a in g and b in g for g in ADJ_SYNONYMS):
            return a, b


def meaning_adjective(rng: random.Random) -> Cluster:
    name = rng.choice(NAMES)
    if rng.random() < 0.15:
        i = rng.randrange(len(ADJ_MOOD_FRAMES))
        pair = _contrast(rng, ADJ_MOODS)
        return Cluster(f"adjective/mood_{i}", "mood", one_change(ADJ_MOOD_FRAMES[i], pair, ordered(*pair), N=name))
    scale = rng.choice(list(ADJ_SCALES))
    adjs, nouns = ADJ_SCALES[scale]
    frames = ADJ_PREDICATE_FRAMES + ADJ_ATTRIBUTIVE_FRAMES + (ADJ_OBJECT_FRAMES if scale in ADJ_OBJECT_SCALES else ())
    i = rng.randrange(len(frames))
    pair, noun = _contrast(rng, adjs), rng.choice(nouns)
    return Cluster(f"adjective/{scale}_{i}", noun, one_change(frames[i], pair, ordered(*pair), N=name, NO=noun,
                                                             T=rng.choice(ADJ_TAILS)))


