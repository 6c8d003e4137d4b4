"""grammar/agreement and grammar/anaphor as 2x2 designs.

Agreement: subject number x verb number. One frame gives the four sentences
(sg subject + sg verb, sg + pl, pl + pl, pl + sg) as two error pairs, one per subject
number, so the verb forms occur in both acceptable and error cells and the swap
directions balance exactly. Each error cell has a twin: the verb put in another
tense, which keeps the sentence acceptable.

Anaphor: antecedent gender x reflexive gender, the same way; the twin replaces the
reflexive with the plain pronoun ("hurt himself" -> "hurt him": acceptable, another
meaning).
"""

from __future__ import annotations

import random

from .frames import NAMES, NAMES_F, NAMES_M, Cluster, error_and_twin

# (singular, plural) nouns; relational ones may take "my"/"our", the rest only "the"
PEOPLE = (("teacher", "teachers"), ("student", "students"), ("child", "children"), ("neighbor", "neighbors"),
          ("doctor", "doctors"), ("girl", "girls"), ("boy", "boys"), ("man", "men"), ("woman", "women"),
          ("player", "players"), ("driver", "drivers"), ("farmer", "farmers"), ("nurse", "nurses"),
          ("baker", "bakers"), ("author", "authors"), ("singer", "singers"), ("manager", "managers"),
          ("worker", "workers"), ("guest", "guests"), ("visitor", "visitors"), ("pilot", "pilots"),
          ("lawyer", "lawyers"), ("soldier", "soldiers"), ("waiter", "waiters"), ("cousin", "cousins"),
          ("artist", "artists"), ("friend", "friends"), ("engineer", "engineers"), ("cook", "cooks"))
RELATIONAL = {"teacher", "neighbor", "doctor", "cousin", "friend", "guest", "manager", "student"}
THINGS = (("key", "keys"), ("book", "books"), ("window", "windows"), ("letter", "letters"), ("box", "boxes"),
          ("car", "cars"), ("door", "doors"), ("picture", "pictures"), ("bottle", "bottles"), ("cup", "cups"),
          ("lamp", "lamps"), ("bag", "bags"), ("chair", "chairs"), ("phone", "phones"), ("ticket", "tickets"),
          ("shoe", "shoes"), ("map", "maps"), ("plate", "plates"), ("bike", "bikes"), ("coat", "coats"),
          ("painting", "paintings"), ("clock", "clocks"), ("table", "tables"), ("glass", "glasses"))
THING_DETS = ("the", "my", "our", "her", "his", "your", "their")
ADJ_PEOPLE = ("old", "new", "young", "local", "tall", "quiet", "friendly")
ADJ_THINGS = ("old", "new", "blue", "small", "heavy", "wooden", "cheap")
PP_PEOPLE = ("near the windows", "by the old gate", "from the village", "with the red hats", "in the front rows",
             "behind the fences", "across the street", "on the second floor", "from the northern islands",
             "at the corner tables", "next to the twins", "with the long beard")
PP_THINGS = ("on the shelves", "under the bed", "in the kitchen drawers", "by the front door",
             "from the old house", "for the guests", "with the broken handles", "in the blue boxes",
             "near the lamp", "on the top shelf", "behind the curtains")
# (singular, plural, singular twin, plural twin): the twin keeps number and changes tense.
BE = ("is", "are", "was", "were")
VERBS_PEOPLE = (
    (BE, ("very tired", "in the garden", "happy with the result", "late for the meeting again",
          "afraid of the dark", "ready to leave", "busy this week", "still on the phone",
          "angry about the noise", "sure about the plan")),
    (("was", "were", "is", "are"), ("tired after the long trip", "at the market", "surprised by the news",
                                    "sitting by the fire", "waiting outside")),
    (("has", "have", "had", "had"), ("already left the building", "finished the work early",
                                     "lost the tickets again", "been here before", "seen this film twice")),
    (("does", "do", "did", "did"), ("not like cold weather", "not want to go home yet", "not know the answer")),
    (("walks", "walk", "walked", "walked"), ("to school every morning", "along the river after dinner")),
    (("likes", "like", "liked", "liked"), ("fresh bread with butter", "long walks in the park")),
    (("needs", "need", "needed", "needed"), ("more time to finish the task", "a quiet place to work")),
    (("wants", "want", "wanted", "wanted"), ("to see the ocean", "a bigger room")),
    (("lives", "live", "lived", "lived"), ("near the old bridge", "in a small flat downtown")),
    (("works", "work", "worked", "worked"), ("at the hospital on weekends", "late most evenings")),
    (("seems", "seem", "seemed", "seemed"), ("a bit nervous", "to enjoy the music")),
    (("knows", "know", "knew", "knew"), ("the way to the station", "every song on the radio")),
    (("looks", "look", "looked", "looked"), ("tired after the game", "happy in the photo")),
)
VERBS_THINGS = (
    (BE, ("on the kitchen table", "broken again", "too expensive for us", "in the top drawer",
          "still missing", "covered in dust")),
    (("was", "were", "is", "are"), ("under the bed", "in the car", "very old and dirty", "on sale")),
    (("has", "have", "had", "had"), ("been moved to the attic", "already been cleaned", "never been used")),
    (("looks", "look", "looked", "looked"), ("brand new", "older than I thought")),
    (("seems", "seem", "seemed", "seemed"), ("out of place here", "smaller than before")),
)
ADV = ("As usual", "According to my sister", "Oddly enough", "Luckily", "To be honest", "As far as I know",
       "Apparently", "I suppose")


def agreement(rng: random.Random) -> Cluster:
    people = rng.random() < 0.6
    sg, pl = rng.choice(PEOPLE if people else THINGS)
    if people:
        det = rng.choice(("the", "the", "my", "our")) if sg in RELATIONAL else "the"
    else:
        det = rng.choice(THING_DETS)
    adj = rng.choice(ADJ_PEOPLE if people else ADJ_THINGS) if rng.random() < 0.4 else ""
    forms, preds = rng.choice(VERBS_PEOPLE if people else VERBS_THINGS)
    v_sg, v_pl, t_sg, t_pl = forms
    slots = dict(P=rng.choice(preds), PP=rng.choice(PP_PEOPLE if people else PP_THINGS), N=rng.choice(NAMES),
                 ADV=rng.choice(ADV), D=det, A=adj)
    frames = [
        ("simple", "{D} {A} {S} {X} {P}."),
        ("attractor_pp", "{D} {A} {S} {PP} {X} {P}."),
        ("fronted_adverbial", "{ADV}, {D} {A} {S} {X} {P}."),
        ("embedded_that", "{N} told me that {D} {A} {S} {X} {P}."),
        ("think_attractor", "I think {D} {A} {S} {PP} {X} {P}."),
        ("object_relative", "{D} {A} {S} that {N} " + ("met last year" if people else "bought last year")
         + " {X} {P}."),
        ("nobody_noticed", "Nobody noticed that {D} {A} {S} {X} {P}."),
        ("tail_clause", "{D} {A} {S} {X} {P}, but nobody seems to care."),
    ]
    if people and forms == BE:
        frames.append(("why_question", "Why {X} {D} {A} {S} so " + rng.choice(("quiet", "upset", "nervous", "late"))
                       + "?"))
    tid, frame = rng.choice(frames)
    # The error is seen at the verb, except where the verb comes first (a question): at the subject.
    det_slot = "S" if tid == "why_question" else None
    sg_pair = error_and_twin(frame, (v_sg, v_pl, t_sg), twin_kind="acceptable", detect=det_slot, swap="sg->pl",
                             role="subj_sg:verb_pl", twin_detect=True, S=sg, **slots)
    pl_pair = error_and_twin(frame, (v_pl, v_sg, t_pl), twin_kind="acceptable", detect=det_slot, swap="pl->sg",
                             role="subj_pl:verb_sg", twin_detect=True, S=pl, **slots)
    pl_pair[1] = _retwin(pl_pair[1], 2)
    return Cluster(f"agreement/{tid}", sg, sg_pair + pl_pair)


def _retwin(v, error_index: int):
    from dataclasses import replace

    return replace(v, twin_of=error_index)


# ------------------------------------------------------------------------------ anaphor

ANA_MALE = NAMES_M + ("the king", "my uncle", "the boy", "her father", "the old man", "the prince", "his brother",
                      "my grandfather", "the young man")
ANA_FEMALE = NAMES_F + ("the queen", "my aunt", "the girl", "his mother", "the old woman", "the princess",
                        "her sister", "my grandmother", "the young woman")
# Verb phrases in which the plain pronoun is as acceptable as the reflexive ("hurt him").
ANA_VPS = ("hurt {X} while cooking", "hurt {X} playing football", "saw {X} in the mirror",
           "blamed {X} for the accident", "introduced {X} to the new neighbors", "cut {X} on a piece of glass",
           "taught {X} to play the guitar", "reminded {X} to buy milk", "described {X} as shy",
           "bought {X} a new coat", "made {X} a cup of tea", "pushed {X} too hard during training",
           "told {X} to stay calm", "found {X} alone in the dark", "hid {X} behind the curtain",
           "dried {X} with a towel", "asked {X} the same question again", "promised {X} a long holiday",
           "treated {X} to an expensive dinner", "poured {X} a glass of water", "photographed {X} by the lake")
ANA_FRONT = ("Last night", "After the game", "On the first day", "Without thinking", "For once", "Later that evening",
             "As usual")
ANA_EVENTS = ("the mistake", "losing the race", "missing the train", "what happened that night", "the argument")


def anaphor(rng: random.Random) -> Cluster:
    m, f = rng.choice(ANA_MALE), rng.choice(ANA_FEMALE)
    vp = rng.choice(ANA_VPS)
    frames = (
        ("simple", "{S} " + vp + "."),
        ("fronted", "{F}, {S} " + vp + "."),
        ("says_that", "{O} says that {S} " + vp + "."),
        ("nobody_noticed", "{S} " + vp + ", but nobody noticed."),
        ("i_think", "I think {S} " + vp + "."),
        ("forgave", "{S} never forgave {X} for {E}."),
        ("proud", "{S} should be proud of {X} after such a hard year."),
    )
    tid, frame = rng.choice(frames)
    slots = dict(F=rng.choice(ANA_FRONT), O=rng.choice(("Everyone", "My sister", "The coach", "Our neighbor")),
                 E=rng.choice(ANA_EVENTS))
    male = error_and_twin(frame, ("himself", "herself", "him"), twin_kind="acceptable", swap="m->f",
                          role="ante_m:refl_f", S=m, **slots)
    female = error_and_twin(frame, ("herself", "himself", "her"), twin_kind="acceptable", swap="f->m",
                            role="ante_f:refl_m", S=f, **slots)
    female[1] = _retwin(female[1], 2)
    return Cluster(f"anaphor/{tid}", m.split()[-1], male + female)
