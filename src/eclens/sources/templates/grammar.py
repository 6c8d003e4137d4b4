"""grammar/article, grammar/tense and grammar/preposition: an error pair and its twin per frame.

Article: "an" <-> "a" by the next word's sound; the error shows only at that next
word (``detect``); the twin is "the". Tense: the verb in a tense its time adverbial
rules out (the adverbial is ``detect`` when it follows the verb); the twin is the
same form of a partner verb that fits the same complements. Preposition: a head
word's required preposition swapped for a wrong one; the twin is another
preposition the head accepts ("looked at" -> "looked for").
"""

from __future__ import annotations

import random

from .frames import NAMES, Cluster, error_and_twin

# ------------------------------------------------------------------------------ article

# (vowel-initial nouns, consonant-initial nouns, vowel-initial adjectives, consonant-initial adjectives); every
# word's spelling gives its sound.
ART_CLASSES = {
    "thing": (("apple", "egg", "orange", "umbrella", "envelope", "onion", "album", "eraser", "iron", "oven"),
              ("book", "cake", "bottle", "ticket", "coat", "letter", "pen", "cup", "bag", "hat", "camera", "lamp",
               "map", "candle", "key", "pillow", "sandwich", "newspaper"),
              ("old", "extra", "expensive", "ugly", "ordinary", "unusual"),
              ("new", "red", "small", "big", "cheap", "heavy", "beautiful", "broken", "strange")),
    "animal": (("elephant", "owl", "eagle", "octopus", "ostrich", "otter"),
               ("cat", "dog", "horse", "rabbit", "mouse", "fox", "deer", "bird", "snake", "frog"),
               ("enormous", "angry", "injured", "unusual"),
               ("small", "big", "young", "strange", "hungry", "wild")),
    "person": (("actor", "artist", "engineer", "officer", "author", "architect", "editor", "athlete"),
               ("teacher", "doctor", "nurse", "farmer", "student", "pilot", "lawyer", "singer", "waiter", "baker"),
               ("old", "angry", "elderly", "excellent", "experienced", "unknown"),
               ("young", "famous", "friendly", "tired", "new", "local")),
    "idea": (("idea", "answer", "offer", "opinion", "argument", "excuse", "explanation"),
             ("plan", "question", "story", "reason", "suggestion", "proposal"),
             ("interesting", "excellent", "awful", "important", "obvious", "unusual", "odd"),
             ("good", "strange", "simple", "serious", "funny", "new", "clever")),
}
ART_FRAMES = {
    "thing": ("{N} found {X} {NP} under the old sofa.", "There was {X} {NP} on the kitchen table this morning.",
              "I bought {X} {NP} at the market on Sunday.", "Can you bring me {X} {NP} from the shop?",
              "She kept {X} {NP} in the drawer next to her bed.",
              "He wrapped {X} {NP} in brown paper and gave it to {N}.", "We need {X} {NP} before the guests arrive.",
              "{N} gave me {X} {NP} for my birthday.", "When we got home, {N} noticed {X} {NP} next to the door."),
    "animal": ("We saw {X} {NP} near the lake yesterday.", "{N} took a photo of {X} {NP} at the zoo.",
               "Last night {X} {NP} woke up the whole house.", "From the kitchen window, {N} could see {X} {NP} "
               "in the field.", "The children found {X} {NP} behind the barn."),
    "person": ("{N} wants to become {X} {NP} one day.", "My cousin married {X} {NP} from Ireland.",
               "We asked {X} {NP} for directions to the station.", "There is {X} {NP} waiting for you at the door.",
               "{N} works as {X} {NP} in a small town.", "Last year {N} met {X} {NP} on the train."),
    "idea": ("{N} came up with {X} {NP} during the meeting.", "We need {X} {NP} by the end of the week.",
             "{N} gave us {X} {NP} that made no sense.", "After a long silence, {N} offered {X} {NP}."),
}
# "the" fits every article frame except these (the twin would need another word there)
ART_NO_THE = ("{N} wants to become {X} {NP} one day.", "{N} works as {X} {NP} in a small town.",
              "There is {X} {NP} waiting for you at the door.")


def article(rng: random.Random) -> Cluster:
    cls = rng.choice(list(ART_CLASSES))
    v_nouns, c_nouns, v_adjs, c_adjs = ART_CLASSES[cls]
    frames = [f for f in ART_FRAMES[cls] if f not in ART_NO_THE]
    i = rng.randrange(len(frames))
    vowel = rng.random() < 0.5  # whether the word after the article starts with a vowel sound: balances a<->an
    with_adj = rng.random() < (0.85 if cls == "idea" else 0.5)
    if with_adj:
        noun = rng.choice(v_nouns + c_nouns)
        np = f"{rng.choice(v_adjs if vowel else c_adjs)} {noun}"
    else:
        noun = rng.choice(v_nouns if vowel else c_nouns)
        np = noun
    good, bad = ("an", "a") if vowel else ("a", "an")
    vs = error_and_twin(frames[i], (good, bad, "the"), twin_kind="acceptable", detect="X+1",
                        swap=f"{good}->{bad}", NP=np, N=rng.choice(NAMES))
    return Cluster(f"article/{cls}_{i}", noun, vs)


# -------------------------------------------------------------------------------- tense

# Partner verbs share their complements, so either fits the frame: (forms, forms, complements);
# forms are base, third person singular, past, past participle.
TENSE_PAIRS = (
    (("walk", "walks", "walked", "walked"), ("run", "runs", "ran", "run"),
     ("to the station", "along the river", "home in the rain")),
    (("buy", "buys", "bought", "bought"), ("sell", "sells", "sold", "sold"),
     ("the old car", "fresh fish at the market", "tickets for the concert")),
    (("see", "sees", "saw", "seen"), ("meet", "meets", "met", "met"),
     ("an old friend at the market", "the new manager", "the neighbors")),
    (("win", "wins", "won", "won"), ("lose", "loses", "lost", "lost"), ("the race", "the final match", "the game")),
    (("write", "writes", "wrote", "written"), ("read", "reads", "read", "read"),
     ("a long letter", "three pages of notes", "a short poem")),
    (("give", "gives", "gave", "given"), ("send", "sends", "sent", "sent"),
     ("a present to the teacher", "the keys to the landlord", "a card to my aunt")),
    (("find", "finds", "found", "found"), ("lose", "loses", "lost", "lost"), ("the keys", "a wallet", "the map")),
    (("call", "calls", "called", "called"), ("visit", "visits", "visited", "visited"),
     ("the doctor", "an old friend", "the office")),
    (("open", "opens", "opened", "opened"), ("close", "closes", "closed", "closed"),
     ("the window", "the door", "the shop at nine")),
    (("clean", "cleans", "cleaned", "cleaned"), ("paint", "paints", "painted", "painted"),
     ("the kitchen", "the windows", "the fence")),
    (("take", "takes", "took", "taken"), ("miss", "misses", "missed", "missed"),
     ("the early train", "the bus", "the last boat")),
    (("start", "starts", "started", "started"), ("finish", "finishes", "finished", "finished"),
     ("the work", "a new book", "the lesson")),
    (("sing", "sings", "sang", "sung"), ("play", "plays", "played", "played"), ("a song at the party", "a tune")),
    (("bring", "brings", "brought", "brought"), ("carry", "carries", "carried", "carried"),
     ("a cake to the office", "the bags upstairs")),
    (("hide", "hides", "hid", "hidden"), ("find", "finds", "found", "found"),
     ("the presents in the attic", "the letter under a book")),
    (("wash", "washes", "washed", "washed"), ("dry", "dries", "dried", "dried"), ("the dishes", "the car")),
    (("fix", "fixes", "fixed", "fixed"), ("break", "breaks", "broke", "broken"),
     ("the old bike", "the window", "the radio")),
    (("love", "loves", "loved", "loved"), ("hate", "hates", "hated", "hated"), ("the new film", "cold weather")),
    (("eat", "eats", "ate", "eaten"), ("cook", "cooks", "cooked", "cooked"),
     ("dinner with friends", "rice and beans", "the fish")),
    (("drink", "drinks", "drank", "drunk"), ("pour", "pours", "poured", "poured"),
     ("a cup of tea", "cold water", "the milk")),
    (("throw", "throws", "threw", "thrown"), ("catch", "catches", "caught", "caught"), ("the ball",)),
    (("teach", "teaches", "taught", "taught"), ("take", "takes", "took", "taken"),
     ("a class on history", "the evening course")),
)
# subject, and whether it takes the -s form in the present
TENSE_SUBJECTS = tuple((n, True) for n in NAMES[::2]) + (
    ("my brother", True), ("the teacher", True), ("our neighbor", True), ("the old man", True), ("she", True),
    ("he", True), ("my aunt", True), ("the new student", True), ("my parents", False), ("the children", False),
    ("the students", False), ("we", False), ("they", False), ("I", False), ("our guests", False))
PAST_FRONT = ("Yesterday", "Last night", "Two days ago", "Last summer", "In 2015", "A week ago", "Last Monday",
              "Years ago")
PAST_END = ("yesterday", "last night", "last week", "two weeks ago", "in 2012", "a few months ago")
FUT_FRONT = ("Tomorrow", "Next week", "Later tonight", "Next summer", "In a few days", "Soon")
FUT_END = ("tomorrow", "next week", "next year", "after lunch", "on Friday")
PRES_FRONT = ("Every morning", "Most days", "Every week", "Usually", "On Sundays")
PRES_END = ("every day", "every morning", "most weekends", "twice a week")


def tense(rng: random.Random) -> Cluster:
    v, w, comps = rng.choice(TENSE_PAIRS)
    if rng.random() < 0.5:
        v, w = w, v
    subj, third = rng.choice(TENSE_SUBJECTS)
    comp = rng.choice(comps)
    if rng.random() < 0.5:  # a past context, a present form: the direction past->nonpast
        kind = rng.choice(("past_front", "past_end"))
        words = (v[2], v[1] if third else v[0], w[2])
        swap = "past->nonpast"
        if kind == "past_front":
            frame, a, det = "{A}, {S} {X} {C}.", rng.choice(PAST_FRONT), None
        else:
            frame, a, det = "{S} {X} {C} {A}.", rng.choice(PAST_END), "A"
    else:
        kind = rng.choice(("future_front", "future_end", "present_front", "present_end", "perfect"))
        swap = "nonpast->past"
        if kind.startswith("future"):
            words = (v[0], v[2], w[0])
            frame, a, det = (("{A}, {S} will {X} {C}.", rng.choice(FUT_FRONT), None) if kind == "future_front"
                             else ("{S} will {X} {C} {A}.", rng.choice(FUT_END), None))
        elif kind.startswith("present"):
            pres = (v[1], w[1]) if third else (v[0], w[0])
            words = (pres[0], v[2], pres[1])
            frame, a, det = (("{A}, {S} {X} {C}.", rng.choice(PRES_FRONT), None) if kind == "present_front"
                             else ("{S} {X} {C} {A}.", rng.choice(PRES_END), "A"))
        else:
            # "has ate": the simple past where it differs from the participle, else the bare form
            wrong = v[2] if v[2] != v[3] else v[0]
            words = (v[3], wrong, w[3])
            frame, a, det = "{S} {AUX} already {X} {C}.", "", None
    vs = error_and_twin(frame, words, twin_kind="acceptable", detect=det, swap=swap, S=subj, C=comp, A=a,
                        AUX="has" if third else "have")
    return Cluster(f"tense/{kind}", (a or "already").split()[0].lower(), vs)


# -------------------------------------------------------------------------- preposition

# (frame with {N} and {O}, required preposition, twin preposition (acceptable), wrong ones, objects)
PREP_HEADS = (
    ("{N} looked {X} the {O}", "at", "for", ("of", "from"), ("keys", "map", "photos", "letter")),
    ("{N} talked {X} the {O}", "to", "with", ("from", "in"), ("manager", "doctor", "neighbors", "teacher")),
    ("{N} arrived {X} the {O}", "at", "near", ("of", "to"), ("station", "hotel", "airport", "museum")),
    ("{N} waited {X} the {O}", "for", "on", ("of", "to"), ("bus", "results", "doctor", "train")),
    ("{N} was afraid {X} the {O}", "of", "for", ("from", "at"), ("dog", "horse", "children", "old man")),
    ("{N} was angry {X} the {O}", "with", "at", ("of", "on"), ("driver", "neighbors", "landlord", "waiter")),
    ("{N} listened {X} the {O}", "to", "for", ("at", "of"), ("radio", "rain", "bell", "music")),
    ("{N} laughed {X} the {O}", "at", "about", ("of", "on"), ("joke", "old photos", "clown", "story")),
    ("{N} thought {X} the {O}", "about", "of", ("at", "to"), ("trip", "offer", "problem", "garden")),
    ("{N} asked {X} the {O}", "for", "about", ("on", "at"), ("bill", "keys", "menu", "address")),
    ("{N} worried {X} the {O}", "about", "over", ("of", "at"), ("exam", "money", "weather", "children")),
    ("{N} spoke {X} the {O}", "to", "with", ("from", "on"), ("manager", "students", "police", "nurse")),
    ("{N} jumped {X} the {O}", "over", "onto", ("of", "from"), ("fence", "wall", "table", "bench")),
    ("{N} knocked {X} the {O}", "on", "at", ("of", "from"), ("door", "window", "gate")),
    ("{N} shouted {X} the {O}", "at", "to", ("of", "on"), ("children", "driver", "dog", "players")),
    ("{N} pointed {X} the {O}", "at", "to", ("of", "for"), ("map", "sky", "old house", "clock")),
    ("{N} ran {X} the {O}", "to", "from", ("of", "at"), ("station", "car", "river", "shop")),
    ("{N} was late {X} the {O}", "for", "to", ("of", "on"), ("meeting", "train", "lesson", "dinner")),
    ("{N} dreamed {X} the {O}", "of", "about", ("at", "for"), ("sea", "mountains", "old house", "summer")),
    ("{N} complained {X} the {O}", "about", "of", ("at", "on"), ("noise", "food", "weather", "prices")),
    ("{N} cared {X} the {O}", "about", "for", ("of", "on"), ("garden", "children", "old dog", "house")),
    ("{N} heard {X} the {O}", "about", "of", ("at", "on"), ("accident", "wedding", "new shop", "fire")),
    ("{N} was good {X} the {O}", "at", "with", ("on", "of"), ("game", "piano", "job", "guitar")),
)
PREP_PRE = ("", "Yesterday,", "As usual,", "I heard that", "After lunch,", "According to Tom,")
PREP_POST = ("", "again", "all afternoon", "for a while", "this morning", "without a word")


def preposition(rng: random.Random) -> Cluster:
    i = rng.randrange(len(PREP_HEADS))
    core, good, twin, wrongs, objs = PREP_HEADS[i]
    frame = "{PRE} " + core + " {POST}."
    vs = error_and_twin(frame, (good, rng.choice(wrongs), twin), twin_kind="acceptable", N=rng.choice(NAMES),
                        O=rng.choice(objs), PRE=rng.choice(PREP_PRE), POST=rng.choice(PREP_POST))
    head = core.split("{X}")[0].split()[-1]
    return Cluster(f"preposition/{head}", head, vs)
