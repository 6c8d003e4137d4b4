"""Offline template generator: the default dataset of ``ec run``, no network needed.

Every category has its own sentence frames and word lists, written for this
project. A frame has slots filled from the lists and one changed slot ``{X}``
that takes the clean word in the clean sentence and the corrupt word in the
corrupt one. Frames put the change at varied places (after fronted adverbials,
inside embedded and relative clauses, before trailing phrases), so the changed
token is rarely the last word.

Generation is seeded per category (``sha256(seed, category)``, not Python's
salted ``hash``), so the same seed gives byte-identical output on every machine.
Each candidate is aligned under the target tokenizer; one that is not a
single-token change (or changes the first token, which has no prefix to predict
it from) is replaced by a fresh draw, never dropped silently: the counts of
every rejection are in :func:`generate_templates_with_stats`'s table.
"""

from __future__ import annotations

import hashlib
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import EclensError
from ..pairs import AlignedPair, MinimalPair, align, pair_id
from .categories import resolve_categories

SOURCE = "templates"


@dataclass(frozen=True)
class Candidate:
    template: str
    clean: str
    corrupt: str
    clean_word: str
    corrupt_word: str


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _tidy(s: str) -> str:
    # Optional slots may be empty: collapse the double spaces and " ," they leave.
    while "  " in s:
        s = s.replace("  ", " ")
    return _cap(s.replace(" ,", ",").replace(" .", ".").replace(" ?", "?").strip())


def _render(template: str, frame: str, changed: tuple[str, str], **slots: str) -> Candidate:
    clean = _tidy(frame.format(X=changed[0], **slots))
    corrupt = _tidy(frame.format(X=changed[1], **slots))
    return Candidate(template, clean, corrupt, changed[0], changed[1])


def _two(rng: random.Random, seq: Sequence[str]) -> tuple[str, str]:
    a, b = rng.sample(list(seq), 2)
    return a, b


# --------------------------------------------------------------------------- shared lists

NAMES_M = ("John", "David", "Peter", "James", "Tom", "Mark", "Paul", "Daniel", "Michael", "Robert", "George",
           "Frank", "Henry", "Jack", "Sam", "Ben", "Oliver", "Lucas", "Leo", "Eric", "Kevin", "Brian", "Steve",
           "Martin", "Victor", "Oscar", "Simon", "Luke", "Ryan", "Carl", "Noah", "Arthur", "Hugo", "Felix")
NAMES_F = ("Mary", "Anna", "Sarah", "Emma", "Lucy", "Kate", "Laura", "Alice", "Julia", "Helen", "Rachel", "Sophie",
           "Linda", "Susan", "Jane", "Emily", "Grace", "Olivia", "Claire", "Nina", "Rosa", "Maria", "Ella", "Amy",
           "Hannah", "Diana", "Karen", "Lisa", "Ruth", "Eva", "Irene", "Martha", "Vera", "Clara")
NAMES = NAMES_M + NAMES_F


# ------------------------------------------------------------------- grammar/agreement

AGR_PEOPLE = (("teacher", "teachers"), ("student", "students"), ("child", "children"), ("neighbor", "neighbors"),
              ("doctor", "doctors"), ("girl", "girls"), ("boy", "boys"), ("man", "men"), ("woman", "women"),
              ("player", "players"), ("driver", "drivers"), ("farmer", "farmers"), ("nurse", "nurses"),
              ("baker", "bakers"), ("author", "authors"), ("singer", "singers"), ("manager", "managers"),
              ("worker", "workers"), ("guest", "guests"), ("visitor", "visitors"), ("pilot", "pilots"),
              ("lawyer", "lawyers"), ("soldier", "soldiers"), ("waiter", "waiters"), ("cousin", "cousins"),
              ("artist", "artists"), ("friend", "friends"), ("engineer", "engineers"), ("cook", "cooks"))
AGR_THINGS = (("key", "keys"), ("book", "books"), ("window", "windows"), ("letter", "letters"), ("box", "boxes"),
              ("car", "cars"), ("door", "doors"), ("picture", "pictures"), ("bottle", "bottles"), ("cup", "cups"),
              ("lamp", "lamps"), ("bag", "bags"), ("chair", "chairs"), ("phone", "phones"), ("ticket", "tickets"),
              ("shoe", "shoes"), ("map", "maps"), ("plate", "plates"), ("bike", "bikes"), ("coat", "coats"),
              ("painting", "paintings"), ("clock", "clocks"), ("table", "tables"), ("glass", "glasses"))
AGR_DET_SG = ("the", "this", "that", "my", "our", "her", "his", "your", "their")
AGR_DET_PL = ("the", "these", "those", "my", "our", "her", "his", "your", "their", "some", "many")
AGR_ADJ_PEOPLE = ("old", "new", "young", "local", "tall", "quiet", "friendly")
AGR_ADJ_THINGS = ("old", "new", "blue", "small", "heavy", "wooden", "cheap")
AGR_PP_PEOPLE = ("near the windows", "by the old gate", "from the village", "with the red hats", "in the front rows",
                 "behind the fences", "across the street", "on the second floor", "from the northern islands",
                 "at the corner tables", "next to the twins", "with the long beard")
AGR_PP_THINGS = ("on the shelves", "under the bed", "in the kitchen drawers", "by the front door",
                 "from the old house", "for the guests", "with the broken handles", "in the blue boxes",
                 "near the lamp", "on the top shelf", "behind the curtains")
# (singular form, plural form), then predicates that fit every subject of the group.
AGR_VERBS_PEOPLE = (
    (("is", "are"), ("very tired today", "in the garden right now", "happy with the result", "late for the meeting again",
                     "afraid of the dark", "ready to leave", "busy this week", "still on the phone",
                     "angry about the noise", "sure about the plan")),
    (("was", "were"), ("tired after the long trip", "at the market this morning", "surprised by the news",
                       "sitting by the fire", "waiting outside for an hour")),
    (("has", "have"), ("already left the building", "finished the work early", "lost the tickets again",
                       "been here before", "seen this film twice")),
    (("does", "do"), ("not like cold weather", "not want to go home yet", "not know the answer")),
    (("walks", "walk"), ("to school every morning", "along the river after dinner")),
    (("likes", "like"), ("fresh bread with butter", "long walks in the park")),
    (("needs", "need"), ("more time to finish the task", "a quiet place to work")),
    (("wants", "want"), ("to see the ocean", "a bigger room")),
    (("lives", "live"), ("near the old bridge", "in a small flat downtown")),
    (("works", "work"), ("at the hospital on weekends", "late most evenings")),
    (("seems", "seem"), ("a bit nervous today", "to enjoy the music")),
    (("knows", "know"), ("the way to the station", "every song on the radio")),
    (("looks", "look"), ("tired after the game", "happy in the photo")),
    (("eats", "eat"), ("lunch at noon", "breakfast very early")),
)
AGR_VERBS_THINGS = (
    (("is", "are"), ("on the kitchen table", "broken again", "too expensive for us", "in the top drawer",
                     "still missing", "covered in dust")),
    (("was", "were"), ("found under the bed", "left in the car overnight", "very old and dirty", "on sale last week")),
    (("has", "have"), ("been moved to the attic", "already been cleaned", "never been used")),
    (("looks", "look"), ("brand new", "older than I thought")),
    (("costs", "cost"), ("more than ten dollars", "too much these days")),
    (("belongs", "belong"), ("to my grandmother", "in the other room")),
    (("seems", "seem"), ("out of place here", "smaller than before")),
)
AGR_ADV = ("As usual", "According to my sister", "Oddly enough", "Luckily", "To be honest", "As far as I know",
           "Apparently", "I suppose")
AGR_QUESTION_ADJ = ("quiet", "upset", "nervous", "tired", "late", "happy", "angry")


def _agr_subject(rng: random.Random, people: bool) -> tuple[str, bool]:
    """A subject noun phrase (lower case) and whether it is plural."""
    sg, pl = rng.choice(AGR_PEOPLE if people else AGR_THINGS)
    plural = rng.random() < 0.5
    det = rng.choice(AGR_DET_PL if plural else AGR_DET_SG)
    adj = rng.choice(AGR_ADJ_PEOPLE if people else AGR_ADJ_THINGS) if rng.random() < 0.4 else ""
    return " ".join(w for w in (det, adj, pl if plural else sg) if w), plural


def _agreement(rng: random.Random) -> Candidate:
    people = rng.random() < 0.6
    subj, plural = _agr_subject(rng, people)
    forms, preds = rng.choice(AGR_VERBS_PEOPLE if people else AGR_VERBS_THINGS)
    good, bad = (forms[1], forms[0]) if plural else forms
    pred = rng.choice(preds)
    pp = rng.choice(AGR_PP_PEOPLE if people else AGR_PP_THINGS)
    name = rng.choice(NAMES)
    frames = [
        ("simple", "{S} {X} {P}."),
        ("attractor_pp", "{S} {PP} {X} {P}."),
        ("fronted_adverbial", "{ADV}, {S} {X} {P}."),
        ("embedded_that", "{N} told me that {S} {X} {P}."),
        ("think_attractor", "I think {S} {PP} {X} {P}."),
        ("object_relative", "{S} that {N} " + ("met last year" if people else "bought last year") + " {X} {P}."),
        ("nobody_noticed", "Nobody noticed that {S} {X} {P}."),
        ("tail_clause", "{S} {X} {P}, but nobody seems to care."),
    ]
    if people and forms == ("is", "are"):
        frames.append(("why_question", "Why {X} {S} so " + rng.choice(AGR_QUESTION_ADJ) + " today?"))
    tid, frame = rng.choice(frames)
    return _render(f"agreement/{tid}", frame, (good, bad), S=subj, P=pred, PP=pp, N=name, ADV=rng.choice(AGR_ADV))


# ----------------------------------------------------------------------- grammar/tense

# base, third person singular, past, past participle; then complements that fit every tense.
TENSE_VERBS = (
    (("walk", "walks", "walked", "walked"), ("to the station", "along the river", "home in the rain")),
    (("go", "goes", "went", "gone"), ("to the cinema", "to bed early", "back to the old shop")),
    (("eat", "eats", "ate", "eaten"), ("the last piece of cake", "dinner with friends", "a sandwich at the office")),
    (("write", "writes", "wrote", "written"), ("a long letter to the bank", "three pages of notes", "a short poem")),
    (("see", "sees", "saw", "seen"), ("a fox in the garden", "the new film", "an old friend at the market")),
    (("take", "takes", "took", "taken"), ("the early train", "a taxi to the airport", "the dog to the vet")),
    (("buy", "buys", "bought", "bought"), ("fresh fish at the market", "a new pair of shoes",
                                           "tickets for the concert")),
    (("drive", "drives", "drove", "driven"), ("to the coast", "the children to school", "across the country")),
    (("speak", "speaks", "spoke", "spoken"), ("to the manager", "at the meeting", "with the new neighbors")),
    (("give", "gives", "gave", "given"), ("a speech at the wedding", "the keys to the landlord",
                                          "a present to the teacher")),
    (("find", "finds", "found", "found"), ("a wallet on the bus", "the missing keys",
                                           "a cheap hotel near the beach")),
    (("make", "makes", "made", "made"), ("pancakes for breakfast", "a cake for the party", "a big mistake")),
    (("visit", "visits", "visited", "visited"), ("the museum", "the old castle", "a friend in the hospital")),
    (("cook", "cooks", "cooked", "cooked"), ("rice and beans", "dinner for everyone")),
    (("play", "plays", "played", "played"), ("tennis in the park", "the piano at the party")),
    (("call", "calls", "called", "called"), ("the doctor", "a taxi", "the office twice")),
    (("clean", "cleans", "cleaned", "cleaned"), ("the kitchen", "the windows", "the car")),
    (("watch", "watches", "watched", "watched"), ("the match on television", "a film about whales")),
    (("sing", "sings", "sang", "sung"), ("a song at the party", "in the choir")),
    (("break", "breaks", "broke", "broken"), ("a glass in the kitchen", "the window by accident")),
    (("drink", "drinks", "drank", "drunk"), ("a cup of tea", "cold water after the run")),
    (("ride", "rides", "rode", "ridden"), ("a bike to work", "a horse on the beach")),
    (("throw", "throws", "threw", "thrown"), ("the ball to the dog", "the old papers away")),
    (("bring", "brings", "brought", "brought"), ("a cake to the office", "flowers for the host")),
    (("teach", "teaches", "taught", "taught"), ("the children to swim", "a class on history")),
    (("sell", "sells", "sold", "sold"), ("the old car", "vegetables at the market")),
    (("tell", "tells", "told", "told"), ("a funny story", "the truth to the police")),
    (("leave", "leaves", "left", "left"), ("the party early", "the house at seven")),
    (("meet", "meets", "met", "met"), ("an old friend in town", "the new manager")),
    (("send", "sends", "sent", "sent"), ("a postcard from Rome", "an email to the team")),
    (("lose", "loses", "lost", "lost"), ("the keys again", "the final match")),
    (("win", "wins", "won", "won"), ("the first prize", "the race")),
    (("grow", "grows", "grew", "grown"), ("tomatoes in the garden", "roses by the fence")),
    (("draw", "draws", "drew", "drawn"), ("a map of the town", "a picture of the house")),
    (("wear", "wears", "wore", "worn"), ("a red coat", "the blue dress")),
    (("forget", "forgets", "forgot", "forgotten"), ("the name of the street", "the tickets at home")),
    (("choose", "chooses", "chose", "chosen"), ("the cheapest room", "a book for the trip")),
    (("begin", "begins", "began", "begun"), ("the lesson at nine", "a new job")),
    (("fly", "flies", "flew", "flown"), ("to Paris", "a small plane over the hills")),
    (("steal", "steals", "stole", "stolen"), ("a bike from the yard",)),
    (("hide", "hides", "hid", "hidden"), ("the presents in the attic", "the letter under a book")),
)
# subject, and whether it takes the -s form in the present
TENSE_SUBJECTS = tuple((n, True) for n in NAMES[::2]) + (
    ("my brother", True), ("the teacher", True), ("our neighbor", True), ("the old man", True), ("she", True),
    ("he", True), ("my aunt", True), ("the new student", True), ("my parents", False), ("the children", False),
    ("the students", False), ("we", False), ("they", False), ("I", False), ("our guests", False),
    ("the twins", False))
TENSE_PAST_FRONT = ("Yesterday", "Last night", "Two days ago", "Last summer", "In 2015", "A week ago",
                    "Last Monday", "Years ago", "On the day of the storm")
TENSE_PAST_END = ("yesterday", "last night", "last week", "two weeks ago", "in 2012", "the day before yesterday",
                  "a few months ago")
TENSE_FUT_FRONT = ("Tomorrow", "Next week", "Later tonight", "Next summer", "In a few days", "Soon")
TENSE_FUT_END = ("tomorrow", "next week", "next year", "after lunch", "on Friday")
TENSE_PERFECT_ADV = ("already", "just", "never", "recently")


def _tense(rng: random.Random) -> Candidate:
    (base, s3, past, part), comps = rng.choice(TENSE_VERBS)
    subj, third = rng.choice(TENSE_SUBJECTS)
    present = s3 if third else base
    comp = rng.choice(comps)
    kind = rng.choice(("past_front", "past_end", "future_front", "future_end", "perfect", "did_not", "by_the_time"))
    if kind == "past_front":
        return _render("tense/past_front", "{A}, {S} {X} {C}.", (past, present), A=rng.choice(TENSE_PAST_FRONT),
                       S=subj, C=comp)
    if kind == "past_end":
        return _render("tense/past_end", "{S} {X} {C} {A}.", (past, present), A=rng.choice(TENSE_PAST_END),
                       S=subj, C=comp)
    if kind == "future_front":
        return _render("tense/future_front", "{A}, {S} will {X} {C}.", (base, past),
                       A=rng.choice(TENSE_FUT_FRONT), S=subj, C=comp)
    if kind == "future_end":
        return _render("tense/future_end", "{S} will {X} {C} {A}.", (base, past), A=rng.choice(TENSE_FUT_END),
                       S=subj, C=comp)
    if kind == "did_not":
        return _render("tense/did_not", "{S} did not {X} {C} {A}.", (base, past), A=rng.choice(TENSE_PAST_END),
                       S=subj, C=comp)
    # Perfect aspect: the participle, corrupted to the simple past where it differs (the
    # classic "has ate") and otherwise to the bare form ("has walk").
    wrong = past if past != part else base
    if kind == "perfect":
        aux = "has" if third else "have"
        return _render("tense/perfect", "{S} {AUX} {ADV} {X} {C}.", (part, wrong), S=subj, AUX=aux,
                       ADV=rng.choice(TENSE_PERFECT_ADV), C=comp)
    return _render("tense/by_the_time", "By the time we arrived, {S} had already {X} {C}.", (part, wrong),
                   S=subj, C=comp)


# --------------------------------------------------------------------- grammar/article

# noun classes: (vowel-initial nouns, consonant-initial nouns, vowel-initial adjectives, consonant-initial adjectives)
ART_CLASSES = {
    "thing": (("apple", "egg", "orange", "umbrella", "envelope", "onion", "album", "eraser", "iron", "ice cube"),
              ("book", "cake", "bottle", "ticket", "coat", "letter", "pen", "cup", "bag", "hat", "camera", "lamp",
               "map", "candle", "key", "pillow", "sandwich", "newspaper"),
              ("old", "extra", "expensive", "ugly", "ordinary", "unusual"),
              ("new", "red", "small", "big", "cheap", "heavy", "beautiful", "broken", "strange")),
    "animal": (("elephant", "owl", "eagle", "insect", "ant", "octopus", "ostrich"),
               ("cat", "dog", "horse", "rabbit", "mouse", "fox", "deer", "bird", "snake", "frog"),
               ("old", "enormous", "angry", "ugly", "unusual"),
               ("small", "big", "young", "strange", "hungry", "wild")),
    "person": (("actor", "artist", "engineer", "officer", "author", "architect", "editor", "athlete", "optician"),
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
    "animal": ("We saw {X} {NP} near the lake yesterday.", "There is {X} {NP} in the garden again.",
               "{N} took a photo of {X} {NP} at the zoo.", "Last night {X} {NP} woke up the whole house.",
               "According to {N}, {X} {NP} lives behind the barn.",
               "From the kitchen window, {N} could see {X} {NP} in the field."),
    "person": ("{N} wants to become {X} {NP} one day.", "My cousin married {X} {NP} from Ireland.",
               "We asked {X} {NP} for directions to the station.", "There is {X} {NP} waiting for you at the door.",
               "{N} works as {X} {NP} in a small town.", "Last year {N} met {X} {NP} on the train.",
               "At the end of our street there lives {X} {NP} who sells flowers."),
    "idea": ("{N} came up with {X} {NP} during the meeting.", "That is {X} {NP} I have not heard before.",
             "We need {X} {NP} by the end of the week.", "{N} gave us {X} {NP} that made no sense.",
             "It was {X} {NP}, but nobody said so.", "After a long silence at the table, {N} offered {X} {NP}."),
}
ART_PLURALS = ("apples", "books", "eggs", "tickets", "letters", "onions", "oranges", "candles", "umbrellas",
               "envelopes", "pens", "maps", "cups", "sandwiches", "newspapers")
ART_PLURAL_FRAMES = ("We bought {X} {NP} at the market.", "There were {X} {NP} on the table when we came in.",
                     "{N} brought {X} {NP} to the party.", "I found {X} {NP} in the back of the car.")


def _starts_with_vowel_sound(word: str) -> bool:
    # Every word in the lists above was chosen so that its spelling gives its sound.
    return word[0] in "aeiou"


def _article(rng: random.Random) -> Candidate:
    name = rng.choice(NAMES)
    if rng.random() < 0.2:
        nps = rng.choice(ART_PLURALS)
        i = rng.randrange(len(ART_PLURAL_FRAMES))
        return _render(f"article/plural_{i}", ART_PLURAL_FRAMES[i], ("some", "a"), NP=nps, N=name)
    cls = rng.choice(list(ART_CLASSES))
    v_nouns, c_nouns, v_adjs, c_adjs = ART_CLASSES[cls]
    noun = rng.choice(v_nouns if rng.random() < 0.5 else c_nouns)
    # A bare abstract noun reads oddly ("It was a reason"), so ideas usually get an adjective.
    adj = rng.choice(v_adjs if rng.random() < 0.5 else c_adjs) if rng.random() < (0.85 if cls == "idea" else 0.5) \
        else ""
    np = f"{adj} {noun}".strip()
    good = "an" if _starts_with_vowel_sound(np) else "a"
    bad = "a" if good == "an" else "an"
    i = rng.randrange(len(ART_FRAMES[cls]))
    return _render(f"article/{cls}_{i}", ART_FRAMES[cls][i], (good, bad), NP=np, N=name)


# ----------------------------------------------------------------- grammar/preposition

# (word, required preposition, wrong prepositions, objects)
PREP_ADJECTIVES = (
    ("interested", "in", ("on", "at"), ("modern art", "the history of the town", "learning Spanish", "old maps")),
    ("afraid", "of", ("from", "with"), ("the dark", "large dogs", "flying", "thunder")),
    ("proud", "of", ("on", "from"), ("the garden", "the new bridge", "the team", "the old car")),
    ("good", "at", ("on", "of"), ("chess", "math", "fixing bikes", "telling jokes")),
    ("married", "to", ("at", "of"), ("a doctor", "a famous singer", "my cousin")),
    ("similar", "to", ("as", "of"), ("the rest of the team", "the other students", "most people here")),
    ("different", "from", ("of", "at"), ("the others", "what we expected", "the rest of the family")),
    ("responsible", "for", ("of", "on"), ("the budget", "the accident", "the garden")),
    ("capable", "of", ("to", "at"), ("great things", "running a marathon", "much more")),
    ("famous", "for", ("of", "at"), ("cooking", "painting", "the long stories", "singing old songs")),
    ("fond", "of", ("to", "with"), ("old films", "gardening", "the little dog")),
    ("aware", "of", ("from", "on"), ("the risk", "the problem", "the change in plans")),
    ("keen", "on", ("in", "at"), ("cycling", "the idea", "jazz")),
    ("allergic", "to", ("of", "from"), ("cats", "peanuts", "dust")),
    ("tired", "of", ("at", "on"), ("waiting", "the noise", "the same food every day")),
    ("excited", "about", ("on", "at"), ("the trip", "the new job", "the concert")),
    ("worried", "about", ("of", "on"), ("the exam", "the weather", "the money")),
    ("angry", "with", ("on", "to"), ("the driver", "the neighbors", "the landlord")),
    ("satisfied", "with", ("of", "on"), ("the result", "the new car", "the service")),
)
PREP_NOT_GRADABLE = ("married", "responsible")  # no "very married"
# past-tense verb, preposition, wrong ones, objects, and tails that suit the verb's aspect
_ONCE = ("", "again", "yesterday", "without saying a word")
_LONG = ("", "for a long time", "all afternoon", "yesterday")
_STATE = ("", "as a child", "for many years")
PREP_VERBS = (
    ("believed", "in", ("on", "at"), ("ghosts", "hard work", "second chances"), _STATE),
    ("relied", "on", ("of", "at"), ("the old map", "public transport", "a few close friends"), _STATE),
    ("listened", "to", ("at", "of"), ("the radio", "the teacher", "the rain on the roof"), _LONG),
    ("arrived", "at", ("to",), ("the station", "the hotel", "the airport"), _ONCE),
    ("waited", "for", ("of", "to"), ("the bus", "the results", "the doctor"), _LONG),
    ("apologized", "for", ("of", "on"), ("the delay", "the mistake", "being late"), _ONCE),
    ("insisted", "on", ("in", "at"), ("paying", "a second opinion", "going first"), _ONCE),
    ("laughed", "at", ("on", "of"), ("the joke", "the old photos", "the clown"), _LONG),
    ("dreamed", "of", ("on", "at"), ("a house by the sea", "flying"), _STATE),
    ("searched", "for", ("to", "of"), ("the keys", "a cheaper flat", "the lost dog"), _LONG),
    ("complained", "about", ("at", "on"), ("the noise", "the food", "the long wait"), _ONCE),
    ("paid", "for", ("of",), ("the dinner", "the tickets", "the repairs"), _ONCE),
    ("looked", "at", ("of",), ("the painting", "the map", "the stars"), _LONG),
)
# thing-subject verbs with (subject, object) pairs that make sense together
PREP_THING_VERBS = (
    ("belonged", "to", ("of", "at"), (("watch", "my grandfather"), ("old piano", "the school"),
                                      ("ring", "a famous singer"), ("house", "my aunt"),
                                      ("collection", "a famous painter"))),
    ("consisted", "of", ("from", "at"), (("meal", "bread and cheese"), ("flat", "three small rooms"),
                                         ("course", "two parts"), ("team", "five players"))),
)
PREP_TIME = (
    ("on", ("in", "at"), ("Monday", "Friday evening", "the first day", "New Year's Eve")),
    ("in", ("on", "at"), ("July", "the spring", "August", "the winter")),
    ("at", ("on", "in"), ("noon", "midnight", "six o'clock", "dawn")),
)
PREP_TIME_FRAMES = ("We will meet {X} {O} at the cafe.", "{N} was born {X} {O} in a small town.",
                    "The letter arrived {X} {O}, much later than expected.", "{N} said the party starts {X} {O}.")
PREP_ADVERBS = ("very", "quite", "really", "", "")
PREP_TAILS = {"is": ("", "these days", ", as everyone knows", ", or so I am told"),
              "was": ("", "at the time", ", which surprised nobody", ", or so I was told")}
PREP_FRONT = ("To be honest", "As far as I know", "According to the teacher", "Apparently", "Like most people here")


def _preposition(rng: random.Random) -> Candidate:
    name = rng.choice(NAMES)
    kind = rng.choices(("adj", "verb", "thing", "time"), weights=(5, 4, 1, 1))[0]
    if kind == "time":
        good, wrongs, objs = rng.choice(PREP_TIME)
        i = rng.randrange(len(PREP_TIME_FRAMES))
        return _render(f"preposition/time_{i}", PREP_TIME_FRAMES[i], (good, rng.choice(wrongs)),
                       O=rng.choice(objs), N=name)
    if kind == "thing":
        verb, good, wrongs, pairs = rng.choice(PREP_THING_VERBS)
        thing, obj = rng.choice(pairs)
        frame = rng.choice(("The {T} {V} {X} {O}.", "{N} said the {T} {V} {X} {O}.",
                            "As far as I know, the {T} {V} {X} {O}."))
        return _render("preposition/thing_verb", frame, (good, rng.choice(wrongs)), T=thing, V=verb, O=obj, N=name)
    if kind == "verb":
        verb, good, wrongs, objs, tails = rng.choice(PREP_VERBS)
        frames = (("verb_simple", "{N} {V} {X} {O} {T}."), ("verb_after", "After the meeting, {N} {V} {X} {O}."),
                  ("verb_heard", "I heard that {N} {V} {X} {O} {T}."),
                  ("verb_usual", "{N} {V} {X} {O}, as usual."))
        tid, frame = rng.choice(frames)
        return _render(f"preposition/{tid}", frame, (good, rng.choice(wrongs)), N=name, V=verb, O=rng.choice(objs),
                       T=rng.choice(tails))
    adj, good, wrongs, objs = rng.choice(PREP_ADJECTIVES)
    be = rng.choice(("is", "was"))
    frames = (("adj_simple", "{N} {B} {ADV} {A} {X} {O} {T}."), ("adj_front", "{F}, {N} {B} {A} {X} {O}."),
              ("adj_everyone", "Everyone knows that {N} {B} {ADV} {A} {X} {O}."),
              ("adj_because", "Because {N} was {A} {X} {O}, we changed our plans."))
    tid, frame = rng.choice(frames)
    adv = "" if adj in PREP_NOT_GRADABLE else rng.choice(PREP_ADVERBS)
    return _render(f"preposition/{tid}", frame, (good, rng.choice(wrongs)), N=name, B=be, ADV=adv, A=adj,
                   O=rng.choice(objs), T=rng.choice(PREP_TAILS[be]), F=rng.choice(PREP_FRONT))


# --------------------------------------------------------------------- grammar/anaphor

ANA_MALE = NAMES_M + ("the king", "my uncle", "the boy", "her father", "the old man", "the prince", "his brother",
                      "my grandfather", "the young man")
ANA_FEMALE = NAMES_F + ("the queen", "my aunt", "the girl", "his mother", "the old woman", "the princess",
                        "her sister", "my grandmother", "the young woman")
ANA_PLURAL = ("the children", "my parents", "the students", "the players", "the twins", "our neighbors",
              "the soldiers", "the girls", "the boys", "the guests")
ANA_VPS = ("hurt {X} while cooking", "hurt {X} playing football", "saw {X} in the mirror",
           "blamed {X} for the accident", "introduced {X} to the new neighbors", "cut {X} on a piece of glass",
           "taught {X} to play the guitar", "reminded {X} to buy milk", "described {X} as shy",
           "bought {X} a new coat", "made {X} a cup of tea", "prepared {X} for the worst",
           "pushed {X} too hard during training", "enjoyed {X} at the party", "told {X} to stay calm",
           "allowed {X} a short break", "found {X} alone in the dark", "hid {X} behind the curtain",
           "dried {X} with a towel", "asked {X} the same question again", "promised {X} a long holiday",
           "treated {X} to an expensive dinner", "looked at {X} in the shop window", "poured {X} a glass of water",
           "calmed {X} down with a few deep breaths")
ANA_FRONT = ("Last night", "After the game", "On the first day", "Without thinking", "For once", "Later that evening",
             "As usual")
ANA_EVENTS = ("the mistake", "losing the race", "missing the train", "what happened that night", "the argument")
ANA_PROUD_TAILS = ("after such a hard year", "for finishing the race", "and everyone agreed")


def _anaphor(rng: random.Random) -> Candidate:
    gender = rng.choices(("m", "f", "pl"), weights=(2, 2, 1))[0]
    if gender == "m":
        subj, good, bad = rng.choice(ANA_MALE), "himself", "herself"
        other = rng.choice(NAMES_F)
    elif gender == "f":
        subj, good, bad = rng.choice(ANA_FEMALE), "herself", "himself"
        other = rng.choice(NAMES_M)
    else:
        subj, good, bad = rng.choice(ANA_PLURAL), "themselves", rng.choice(("himself", "herself"))
        other = rng.choice(NAMES)
    vp = rng.choice(ANA_VPS)
    frames = (
        ("simple", "{S} " + vp + "."),
        ("fronted", "{F}, {S} " + vp + "."),
        ("says_that", "{O} says that {S} " + vp + "."),
        ("nobody_noticed", "{S} " + vp + ", but nobody noticed."),
        ("i_think", "I think {S} " + vp + "."),
        ("forgave", "{S} never forgave {X} for {E}."),
        ("proud", "{S} should be proud of {X} {T}."),
    )
    tid, frame = rng.choice(frames)
    return _render(f"anaphor/{tid}", frame, (good, bad), S=subj, F=rng.choice(ANA_FRONT), O=other,
                   E=rng.choice(ANA_EVENTS), T=rng.choice(ANA_PROUD_TAILS))


# ------------------------------------------------------------------------------- typo

# Misspellings that are one token in SmolLM2's vocabulary (found by enumerating dropped,
# doubled and swapped letters of common words) and are not English words themselves.
TYPO_CONCRETE = (("apple", "appl"), ("orange", "orang"), ("cheese", "chees"), ("horse", "hors"), ("bird", "brid"),
                 ("chair", "chir"), ("phone", "phon"), ("radio", "radi"), ("floor", "flor"), ("grass", "gras"),
                 ("cream", "crem"), ("storm", "stom"), ("forest", "fores"), ("street", "stret"),
                 ("office", "offic"), ("school", "schol"), ("doctor", "doctr"), ("smoke", "smok"))
TYPO_ABSTRACT = (("problem", "proble"), ("price", "pric"), ("month", "mont"), ("story", "stor"),
                 ("interest", "interst"), ("energy", "energ"), ("reason", "reson"), ("meaning", "mening"),
                 ("service", "servic"), ("issue", "issu"), ("theory", "theor"), ("purpose", "purpos"),
                 ("memory", "memor"), ("style", "styl"), ("member", "membr"), ("peace", "peac"),
                 ("figure", "figur"), ("sample", "sampl"), ("income", "incom"), ("survey", "surve"),
                 ("secret", "secre"), ("number", "numer"), ("schedule", "schedul"), ("category", "categor"),
                 ("decade", "decad"), ("taste", "tast"), ("parent", "paren"), ("adult", "adul"))
TYPO_CLAUSE_VERBS = (("explain", "explan"), ("describe", "describ"), ("imagine", "imagin"), ("predict", "predic"),
                     ("determine", "determin"), ("recall", "recal"))
TYPO_NP_VERBS = ((("build", "buil"), ("a small house", "the new bridge", "a boat")),
                 (("close", "clos"), ("the door", "the shop early", "the windows")),
                 (("destroy", "destro"), ("the old letters", "the evidence")),
                 (("leave", "leve"), ("the house", "the party early", "the city")),
                 (("survive", "surviv"), ("the winter", "the long journey")),
                 (("escape", "escap"), ("the heat", "the crowd")),
                 (("improve", "improv"), ("the results", "the old recipe")),
                 (("perform", "perfor"), ("the song", "the experiment")))
TYPO_ADJECTIVES = ((("large", "larg"), ("house", "room", "crowd", "garden")),
                   (("happy", "happ"), ("child", "family", "couple")),
                   (("simple", "simpl"), ("plan", "answer", "recipe", "question")),
                   (("clear", "cler"), ("answer", "sky", "water", "message")),
                   (("strange", "strang"), ("noise", "dream", "smell", "message")),
                   (("smooth", "smoot"), ("road", "surface", "stone")),
                   (("remote", "remot"), ("village", "island", "area")),
                   (("false", "fals"), ("claim", "alarm", "statement")),
                   (("tough", "toug"), ("exam", "decision", "question")),
                   (("strict", "stric"), ("teacher", "rule", "coach")),
                   (("proud", "prud"), ("father", "mother", "coach")),
                   (("unique", "uniqu"), ("design", "chance", "style")),
                   (("green", "gren"), ("door", "car", "field", "jacket")))
TYPO_TIMES = ("this morning", "last week", "yesterday", "after lunch", "on Monday", "")
TYPO_ANY_NOUN_FRAMES = ("We talked about the {X} for almost an hour.", "Nobody at the meeting mentioned the {X} again.",
                        "{N} wrote a short note about the {X} and left it on the desk.",
                        "The {X} was the first thing {N} noticed {T}.", "{N} asked me about the {X} {T}.",
                        "There was something odd about the {X}, but nobody could say what.")
TYPO_CONCRETE_FRAMES = ("{N} took a picture of the {X} {T}.", "Did you hear about the {X} {T}?",
                        "I walked past the {X} on my way home {T}.")
TYPO_ABSTRACT_FRAMES = ("The {X} was discussed at length during the meeting.",
                        "We still do not understand the {X} completely.",
                        "{N} explained the {X} to the whole class {T}.")
TYPO_THEIR_FRAMES = ("The children forgot {X} books at school {T}.", "My neighbors painted {X} house blue {T}.",
                     "The players thanked {X} fans after the match.", "Our guests left {X} coats in the hall.")


def _typo(rng: random.Random) -> Candidate:
    name = rng.choice(NAMES)
    t = rng.choice(TYPO_TIMES)
    kind = rng.choices(("concrete", "abstract", "clause_verb", "np_verb", "adj", "their"),
                       weights=(4, 5, 2, 2, 3, 1))[0]
    if kind in ("concrete", "abstract"):
        pair = rng.choice(TYPO_CONCRETE if kind == "concrete" else TYPO_ABSTRACT)
        own = TYPO_CONCRETE_FRAMES if kind == "concrete" else TYPO_ABSTRACT_FRAMES
        frames = TYPO_ANY_NOUN_FRAMES + own
        i = rng.randrange(len(frames))
        return _render(f"typo/noun_{kind}_{i}", frames[i], pair, N=name, T=t)
    if kind == "clause_verb":
        pair = rng.choice(TYPO_CLAUSE_VERBS)
        frame = rng.choice(("It was hard to {X} what happened next.", "Nobody could {X} what {N} had seen {T}.",
                            "{N} tried to {X} how the machine worked."))
        return _render("typo/clause_verb", frame, pair, N=name, T=t)
    if kind == "np_verb":
        pair, objs = rng.choice(TYPO_NP_VERBS)
        frame = rng.choice(("{N} wanted to {X} {O} {T}.", "We had to {X} {O} before the rain started.",
                            "It will be hard to {X} {O} this year."))
        return _render("typo/np_verb", frame, pair, N=name, O=rng.choice(objs), T=t)
    if kind == "their":
        i = rng.randrange(len(TYPO_THEIR_FRAMES))
        return _render(f"typo/their_{i}", TYPO_THEIR_FRAMES[i], ("their", rng.choice(("thir", "ther"))), T=t)
    pair, nouns = rng.choice(TYPO_ADJECTIVES)
    noun = rng.choice(nouns)
    frame = rng.choice(("The {NO} {V} {X} {TT}.", "It was a very {X} {NO}, as far as I remember.",
                        "Everyone agreed that the {NO} was {X}.", "{N} said the {NO} looked {X} {T}."))
    return _render("typo/adjective", frame, pair, N=name, NO=noun, T=t,
                   V=rng.choice(("was", "seemed", "looked")), TT=rng.choice(("to everyone", "at first", "this time")))


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


def _meaning_subject(rng: random.Random) -> Candidate:
    vp = rng.choice(SUBJ_VPS)
    tail = rng.choice(SUBJ_TAILS)
    r = rng.random()
    if r < 0.2:  # two names
        pair = _two(rng, NAMES)
        frame = rng.choice(("Of course {X} {VP} {T}.", "{F}, {X} {VP}.", "I heard that {X} {VP} {T}.",
                            "Everyone was surprised when {X} {VP}."))
        return _render("subject/name", frame, pair, VP=vp, T=tail, F=rng.choice(SUBJ_FRONT))
    plural = r < 0.4
    pair = _two(rng, SUBJ_PEOPLE_PL if plural else SUBJ_PEOPLE)
    frames = (("simple", "The {X} {VP} {T}."), ("fronted", "{F}, the {X} {VP}."), ("cleft", "It was the {X} who {VP}."),
              ("heard", "I heard that the {X} {VP} {T}."), ("surprised", "Everyone was surprised when the {X} {VP}."),
              ("said", "{N} said that the {X} {VP}."), ("adjective", "The {A} {X} {VP} {T}."))
    tid, frame = rng.choice(frames)
    return _render(f"subject/{'plural_' if plural else ''}{tid}", frame, pair, VP=vp, T=tail,
                   F=rng.choice(SUBJ_FRONT), N=rng.choice(NAMES), A=rng.choice(SUBJ_ADJ))


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


def _meaning_location(rng: random.Random) -> Candidate:
    cls = rng.choices(("room", "place", "settlement"), weights=(5, 6, 1))[0]
    words, frames = {"room": (LOC_ROOMS, LOC_ROOM_FRAMES), "place": (LOC_PLACES, LOC_PLACE_FRAMES),
                     "settlement": (LOC_SETTLEMENTS, LOC_SETTLEMENT_FRAMES)}[cls]
    i = rng.randrange(len(frames))
    return _render(f"location/{cls}_{i}", frames[i], _two(rng, words), N=rng.choice(NAMES),
                   O=rng.choice(LOC_OBJECTS), T=rng.choice(LOC_TAILS))


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
        a, b = _two(rng, adjs)
        if not any(a in g and b in g for g in ADJ_SYNONYMS):
            return a, b


def _meaning_adjective(rng: random.Random) -> Candidate:
    name = rng.choice(NAMES)
    if rng.random() < 0.15:
        i = rng.randrange(len(ADJ_MOOD_FRAMES))
        return _render(f"adjective/mood_{i}", ADJ_MOOD_FRAMES[i], _contrast(rng, ADJ_MOODS), N=name)
    scale = rng.choice(list(ADJ_SCALES))
    adjs, nouns = ADJ_SCALES[scale]
    frames = ADJ_PREDICATE_FRAMES + ADJ_ATTRIBUTIVE_FRAMES + (ADJ_OBJECT_FRAMES if scale in ADJ_OBJECT_SCALES else ())
    i = rng.randrange(len(frames))
    return _render(f"adjective/{scale}_{i}", frames[i], _contrast(rng, adjs), N=name, NO=rng.choice(nouns),
                   T=rng.choice(ADJ_TAILS))


# --------------------------------------------------------------------------- driver

BUILDERS: dict[str, Callable[[random.Random], Candidate]] = {
    "grammar/agreement": _agreement,
    "grammar/tense": _tense,
    "grammar/article": _article,
    "grammar/preposition": _preposition,
    "grammar/anaphor": _anaphor,
    "typo": _typo,
    "meaning/subject": _meaning_subject,
    "meaning/location": _meaning_location,
    "meaning/adjective": _meaning_adjective,
}

# Draws per wanted pair before giving up: the default 200 per category needs ~1.3 draws each
# on SmolLM2; a tokenizer that splits many of the words needs more, an exhausted space never ends.
MAX_DRAWS_PER_PAIR = 40


def category_seed(seed: int, category: str) -> int:
    """A per-category seed that does not depend on Python's hash salt or on which categories run."""
    return int.from_bytes(hashlib.sha256(f"eclens-templates\x1f{seed}\x1f{category}".encode()).digest()[:8], "big")


def _position_is_last_word(a: AlignedPair, tokenizer) -> bool:
    # The change is the last word when only punctuation follows it.
    rest = tokenizer.decode(a.clean_ids[a.position + 1:]).strip()
    return all(not ch.isalnum() for ch in rest)


def generate_templates_with_stats(
    tokenizer,
    n_per_category: int = 200,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    prepend_bos: bool = False,
):
    """Template pairs and a per-category table of how they were made.

    Returns ``(pairs, stats)``: ``pairs`` is ``n_per_category`` distinct valid pairs per
    category (a :class:`~eclens.pairs.MinimalPair` list, categories in canonical order);
    ``stats`` a DataFrame with one row per category: ``pairs, draws, duplicates``, one
    ``rejected_<reason>`` column per alignment reason (plus ``rejected_first_token``),
    ``templates`` and ``word_pairs`` (distinct ones used), ``len_min/median/max`` and
    ``pos_min/median/max`` (tokens) and ``last_word_frac`` (share of pairs whose change
    is the sentence's last word).
    """
    import pandas as pd

    if n_per_category < 1:
        raise EclensError(f"--n must be at least 1, got {n_per_category}")
    cats = resolve_categories(list(categories) if categories else None)
    out: list[MinimalPair] = []
    rows = []
    # The first position a change may sit at: one token of prefix, so the model has
    # something to predict the changed token from (BOS counts when it is prepended).
    first_ok = 1
    for cat in cats:
        rng = random.Random(category_seed(seed, cat))
        build = BUILDERS[cat]
        seen: set[tuple[str, str]] = set()
        made: list[AlignedPair] = []
        rejected: Counter = Counter()
        draws = dupes = 0
        limit = MAX_DRAWS_PER_PAIR * n_per_category + 200
        while len(made) < n_per_category:
            if draws >= limit:
                raise EclensError(
                    f"templates: only {len(made)} distinct valid {cat} pairs after {draws} draws "
                    f"(rejected: {dict(rejected)}); ask for fewer with --n or use --source openai")
            draws += 1
            c = build(rng)
            key = (c.clean, c.corrupt)
            if key in seen:
                dupes += 1
                continue
            seen.add(key)
            pair = MinimalPair(
                id=pair_id(c.clean, c.corrupt, cat), clean=c.clean, corrupt=c.corrupt, category=cat, source=SOURCE,
                meta={"template": c.template, "clean_word": c.clean_word, "corrupt_word": c.corrupt_word},
            )
            a = align(pair, tokenizer, prepend_bos=prepend_bos)
            if not isinstance(a, AlignedPair):
                rejected[a.reason] += 1
                continue
            if a.position < first_ok + int(prepend_bos):
                rejected["first_token"] += 1
                continue
            made.append(a)
        out.extend(a.pair for a in made)
        lengths = [a.length for a in made]
        positions = [a.position for a in made]
        row = {"category": cat, "pairs": len(made), "draws": draws, "duplicates": dupes}
        for reason in ("different_length", "multiple_differences", "identical", "empty", "first_token"):
            row[f"rejected_{reason}"] = rejected.get(reason, 0)
        row.update(
            templates=len({a.pair.meta["template"] for a in made}),
            word_pairs=len({(a.pair.meta["clean_word"], a.pair.meta["corrupt_word"]) for a in made}),
            len_min=min(lengths), len_median=statistics.median(lengths), len_max=max(lengths),
            pos_min=min(positions), pos_median=statistics.median(positions), pos_max=max(positions),
            last_word_frac=round(sum(_position_is_last_word(a, tokenizer) for a in made) / len(made), 3),
        )
        rows.append(row)
    return out, pd.DataFrame(rows)


def generate_templates(
    tokenizer,
    n_per_category: int = 200,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    prepend_bos: bool = False,
) -> list[MinimalPair]:
    """``n_per_category`` distinct pairs per category, each a single-token change under ``tokenizer``.

    Seeded and reproducible: the same tokenizer, seed and categories give the same
    pairs in the same order. Uses the tokenizer only (no model forward pass).
    """
    return generate_templates_with_stats(tokenizer, n_per_category, seed, categories, prepend_bos)[0]
