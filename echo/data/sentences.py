"""Deterministic English sentence generator for the synthetic speech corpus.

A small template grammar fills slots from hand-written word lists. Nouns and verbs are
inflected by rule (with exception tables), so the reachable vocabulary is a few thousand
distinct words while the lists stay readable. Numbers are spelled out in words because
that is what the speech engines say; the transcript must match the audio.

Everything is driven by one ``random.Random(seed)``: the same seed gives the same
sentences in the same order on every machine (no set iteration, which depends on
``PYTHONHASHSEED``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

# --- word lists -------------------------------------------------------------------------
# Kept as whitespace-separated strings: compact to read and to edit.

_NOUNS = """
apple arm baby bag ball band bank basket bath beach bean bear bed bee bell bench bird
blanket boat body bone book boot bottle bowl box boy branch bread brick bridge brother
brush bucket building bus butter button cake camera camp candle cap car card carpet cart
castle cat chain chair chicken child church circle city class clock cloud coat coffee
coin collar comb computer cook corner cottage cousin cow cup curtain cushion daughter
desk dinner doctor dog doll door dragon drawer dress drum duck eagle egg elephant engine
eye face factory farm farmer father feather fence field finger fire fish flag floor
flower fly foot forest fork fox friend frog garden gate girl glass glove goat gold
grandmother grass guitar hammer hand hat head heart hill holiday horse hospital house
island jacket jar jewel key king kitchen kite knee knife ladder lake lamp leaf leg
letter library lion lock machine map market match meadow meal milk mirror monkey moon
morning mother mountain mouse mouth nail needle nest net newspaper night nose note
notebook ocean office onion orange owl page pail painter pan paper parcel park parrot
party pear pen pencil piano picture pie pig pillow pilot pipe plane plant plate pocket
pond potato prince princess pump puppy queen rabbit radio rain ring river road robot
rock roof room rope rose sail sailor school scissors sea seed sheep shelf ship shirt
shoe shop singer sister skirt sky snake snow sock soldier son song spoon square stamp
star station stick stone store storm stove street student sugar sun table tail teacher
tent thread ticket tiger toe tomato tooth towel tower town toy tractor train tree truck
tunnel turtle umbrella uncle valley van village violin wagon wall watch water wave
wheel whistle window wing winter wire wolf woman worm writer yard zebra
actor address adventure afternoon airport alarm album angle animal answer apartment
argument army artist assistant attic audience autumn avenue badge bakery balloon
bandage banana barn barrel battery beard bicycle blackboard blade blossom bottom
bracelet brain breakfast breeze bubble budget buffalo bulb bundle cabin cabinet cable
calendar canal candy canoe canvas captain carrot cartoon ceiling cellar champion
channel chapter cheese cherry chimney chocolate circus cliff climate closet clown
coast colony comet concert cookie copper costume cotton couch council country crayon
cricket crown crystal cupboard customer dancer deer desert dessert diamond dictionary
dinosaur director doorway dolphin dragonfly drawing driver eagle editor elbow
elevator envelope eraser evening exhibit expert fabric fairy feast festival film
firefly flute fountain fridge garage garlic gardener giant giraffe glacier globe
grape guard guest hallway harbor harvest helmet hero highway hobby honey hotel
husband iceberg idea insect jelly journey judge jungle kettle kitten ladybug lantern
lawyer lemon lesson lighthouse lizard lobster locket luggage lunch magnet mailbox
manager marble meadow medal melon message metal minute model motor muffin museum
musician mystery necklace neighbor nephew niece noodle nurse oak orchard oven
paddle palace pancake panda parade passenger path peach peanut pebble penguin pepper
pepperoni photo pickle pigeon pirate planet player pocketbook poem poet police
porch postcard pot powder present printer prize problem professor pumpkin puzzle
quilt rabbit raccoon railway rainbow receipt recipe reporter restaurant ribbon rocket
saddle salad sandwich satellite sauce scarf scientist screen sculpture secret shadow
shark shell shepherd shoulder shovel signal silver skeleton sled slipper snail
soup spider sponge squirrel stadium staircase statue stomach strawberry stream
string submarine subway suitcase summer supper surface swan sweater tablet teapot
telephone telescope temple theater thunder tiger toast tongue tortoise tourist
traveler treasure trumpet tulip twig uniform valley vase vegetable vest visitor
volcano waiter wallet walnut warrior waterfall weather whale wheelbarrow widow
window wizard workshop wrench yogurt
"""

# Plural forms that the suffix rules below would get wrong.
_IRREGULAR_PLURALS = {
    "child": "children", "foot": "feet", "goose": "geese", "man": "men", "mouse": "mice",
    "tooth": "teeth", "woman": "women", "sheep": "sheep", "fish": "fish", "deer": "deer",
    "knife": "knives", "leaf": "leaves", "wolf": "wolves", "shelf": "shelves",
    "scissors": "scissors", "buffalo": "buffaloes", "potato": "potatoes",
    "tomato": "tomatoes", "volcano": "volcanoes", "hero": "heroes", "photo": "photos",
    "piano": "pianos", "radio": "radios", "scarf": "scarves", "widow": "widows",
    "yogurt": "yogurts", "roof": "roofs", "giraffe": "giraffes",
}

# Transitive verbs (take an object).
_VERBS_T = """
accept admire answer arrange bake borrow build buy call carry catch change check chase
choose clean climb close collect cook count cover cross cut deliver describe destroy
discover draw drop enjoy explain fill find fix fold follow forget grab guard help hide
hold hug invite join kick kiss knock lift like love mend miss move need notice open
order own paint pack pass pick plant play polish pull push reach read remember repair
rescue return ride ring sell send shake share shut sign smell sort spill steal stir
study surprise take teach tell throw touch trade visit wash watch wear weigh win wrap
write bring feed hit keep leave lose make meet see sing sweep bend bite blow dig
drink drive eat feel fly freeze give grow hang hear know lead lend light shoot spend
spin split spread stick sting strike swing tear throw wake weave wind adopt attach
balance bury capture carve chew clap comfort copy decorate divide dry examine feed
fetch guide hammer heat iron juggle lick load mark measure melt mix nail offer
peel photograph pinch pour praise protect punch question record reject remove
rinse rob rub save scare scrub search serve shave shelter shovel slice soak squeeze
stack stamp steer stretch tickle tow trace train trap unlock unpack warn weigh whip
"""

# Intransitive verbs (no object).
_VERBS_I = """
arrive bark blink breathe cough crawl cry dance disappear dream fall float frown
giggle glow grin hurry jump kneel laugh lie listen march nod pause pray rest rise
run shiver shout sigh sink sit skip sleep slide smile sneeze snore speak stand stare
stay swim travel tremble wait wander whisper wink work yawn yell agree appear blush
bounce cheer complain fade flow gasp hesitate hop hum howl improve knit leap linger
mumble paddle pant relax retire roar rush sail scream settle shine shrug sparkle
squeak stumble sulk sweat tiptoe wobble wriggle
"""

# Past tenses that do not follow "add -ed".
_IRREGULAR_PAST = {
    "build": "built", "buy": "bought", "catch": "caught", "choose": "chose", "cut": "cut",
    "draw": "drew", "find": "found", "forget": "forgot", "hide": "hid", "hold": "held",
    "read": "read", "ride": "rode", "ring": "rang", "sell": "sold", "send": "sent",
    "shake": "shook", "shut": "shut", "steal": "stole", "take": "took", "teach": "taught",
    "tell": "told", "throw": "threw", "wear": "wore", "win": "won", "write": "wrote",
    "bring": "brought", "feed": "fed", "hit": "hit", "keep": "kept", "leave": "left",
    "lose": "lost", "make": "made", "meet": "met", "see": "saw", "sing": "sang",
    "sweep": "swept", "bend": "bent", "bite": "bit", "blow": "blew", "dig": "dug",
    "drink": "drank", "drive": "drove", "eat": "ate", "feel": "felt", "fly": "flew",
    "freeze": "froze", "give": "gave", "grow": "grew", "hang": "hung", "hear": "heard",
    "know": "knew", "lead": "led", "lend": "lent", "light": "lit", "shoot": "shot",
    "spend": "spent", "spin": "spun", "split": "split", "spread": "spread",
    "stick": "stuck", "sting": "stung", "strike": "struck", "swing": "swung",
    "tear": "tore", "wake": "woke", "weave": "wove", "wind": "wound", "fall": "fell",
    "lie": "lay", "rise": "rose", "run": "ran", "sink": "sank", "sit": "sat",
    "sleep": "slept", "slide": "slid", "speak": "spoke", "stand": "stood", "swim": "swam",
    "leap": "leapt", "shine": "shone", "kneel": "knelt",
}

# Verbs whose final consonant doubles before -ed / -ing.
_DOUBLE_FINAL = {
    "drop", "grab", "hug", "knock", "plan", "rob", "rub", "scrub", "shop", "skip",
    "stir", "trap", "whip", "hop", "nod", "wink", "clap", "dig", "spin", "swim", "hit",
    "cut", "shut", "run", "sit", "win", "begin", "stop", "wrap", "chop", "pat", "set",
    "split", "jog", "blot", "knit", "grin", "sob",
}

_ADJECTIVES = """
angry bad beautiful big bitter black blue brave bright broad broken brown busy calm
careful cheap clean clever cold cool crazy curious damp dark deep dirty dry dull
eager early easy empty enormous fair famous fancy fast fat fierce flat fresh friendly
full funny gentle giant glad golden good gray great green happy hard healthy heavy
helpful high hollow honest hot huge hungry icy important jolly kind large late lazy
light little lively lonely long loose loud lovely low lucky magic massive mighty
modern narrow nasty neat nervous new nice noisy odd old orange pale perfect pink
plain pleasant polite poor pretty proud purple quick quiet rare red rich round rough
rude sad safe salty scary sharp shiny short shy silent silly simple slim slow small
smart smooth soft sour spicy square steep sticky strange strict strong sturdy sunny
sweet tall tame tender thick thin tidy tiny tired tough ugly warm weak wet white wide
wild wise wooden yellow young ancient awful bold bumpy chilly clumsy cozy crisp
crooked dusty elegant faint fluffy foggy fragile frozen gloomy graceful grumpy hairy
handsome heavy humble juicy lazy mellow misty muddy mysterious narrow nimble plump
precious puzzled rapid rusty sandy scruffy shabby sleepy slippery sparkling spotted
stormy striped swift thirsty thoughtful tricky velvet wet windy wobbly wrinkled
"""

_ADVERBS = """
quickly slowly quietly loudly carefully happily sadly gently suddenly easily badly
eagerly bravely calmly cheerfully angrily politely proudly rarely often always never
sometimes usually soon later today yesterday tomorrow again together alone early late
nearly almost barely finally honestly kindly lazily neatly nervously patiently
quietly rudely safely secretly silently softly warmly wisely boldly briskly busily
clumsily gladly hastily loosely merrily openly playfully promptly roughly sharply
shyly smoothly sternly swiftly tenderly wildly
"""

_NAMES = """
adam alice amelia andrew anna arthur ben bella carl carol charlie chloe daniel david
diana edward ella emily emma ethan felix fiona frank george grace hannah harry helen
henry isaac isabel jack jacob james jane jason julia kate kevin laura leo lily lucas
lucy mark martha mary matthew maya michael mia nathan nina noah oliver olivia oscar
paul peter rachel robert rose ruby sam sarah simon sophie thomas tom victor william
zoe albert beatrice clara dennis eric flora gavin harold irene jasper kathleen
leonard margaret nora patrick quentin rita steven teresa ursula vincent wendy
"""

_PLACES = """
kitchen garden market station library harbor village forest school museum park office
bakery farm beach castle hospital river valley city attic cellar barn stadium theater
airport island desert meadow
"""

_TIMES = [
    "this morning", "last night", "yesterday", "today", "after lunch", "before dinner",
    "on monday", "on tuesday", "on wednesday", "on thursday", "on friday", "on saturday",
    "on sunday", "in january", "in february", "in march", "in april", "in may", "in june",
    "in july", "in august", "in september", "in october", "in november", "in december",
    "at noon", "at midnight", "last week", "next week", "every evening", "in the spring",
    "in the summer", "in the autumn", "in the winter", "after school", "at sunrise",
]

_NUMBERS = [
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fifteen", "twenty", "thirty", "forty", "fifty", "sixty",
    "a hundred",
]

_PREPOSITIONS = [
    "near", "behind", "under", "beside", "above", "inside", "across", "past", "around",
    "beyond",
]

_DETERMINERS = ["the", "a", "my", "your", "her", "his", "our", "their", "that", "this"]

_MODALS = ["will", "can", "should", "might", "must", "could", "would"]


def _words(block: str) -> list[str]:
    """Split a word block, dropping duplicates but keeping first-seen order."""
    return list(dict.fromkeys(block.split()))


NOUNS = _words(_NOUNS)
VERBS_T = _words(_VERBS_T)
VERBS_I = _words(_VERBS_I)
ADJECTIVES = _words(_ADJECTIVES)
ADVERBS = _words(_ADVERBS)
NAMES = _words(_NAMES)
PLACES = ["the " + p for p in _words(_PLACES)]


# --- inflection ---------------------------------------------------------------------


def plural(noun: str) -> str:
    """English plural of a noun from the list (rules plus an exception table)."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith("fe"):
        return noun[:-2] + "ves"
    return noun + "s"


def third_person(verb: str) -> str:
    """Present tense, third person singular ("she ...")."""
    if verb.endswith(("s", "x", "z", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _stem_for_suffix(verb: str) -> str:
    return verb + verb[-1] if verb in _DOUBLE_FINAL and verb[-1] not in "wxy" else verb


def past(verb: str) -> str:
    """Simple past tense."""
    if verb in _IRREGULAR_PAST:
        return _IRREGULAR_PAST[verb]
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return _stem_for_suffix(verb) + "ed"


def gerund(verb: str) -> str:
    """The -ing form."""
    if verb == "lie":
        return "lying"
    if verb.endswith("ie"):
        return verb[:-2] + "ying"
    if verb.endswith("e") and not verb.endswith(("ee", "ye", "oe")):
        return verb[:-1] + "ing"
    return _stem_for_suffix(verb) + "ing"


# --- grammar ------------------------------------------------------------------------


class SentenceGenerator:
    """Random sentences from a template grammar, reproducible from ``seed``.

    ``sentence()`` draws one sentence (lowercase words separated by single spaces, no
    punctuation, numbers spelled out). ``unique(n)`` draws ``n`` distinct sentences
    whose word counts lie in ``[min_words, max_words]``.
    """

    def __init__(self, seed: int = 0, min_words: int = 6, max_words: int = 15) -> None:
        self.rng = random.Random(seed)
        self.min_words = min_words
        self.max_words = max_words
        self._templates: list[Callable[[], str]] = [
            self._t_past_svo, self._t_modal, self._t_question, self._t_said,
            self._t_plural_habit, self._t_there_are, self._t_progressive, self._t_please,
            self._t_intransitive, self._t_two_clauses, self._t_think, self._t_pair,
            self._t_has, self._t_without, self._t_possessive, self._t_dont, self._t_its,
            self._t_when, self._t_because, self._t_where, self._t_then, self._t_but,
        ]

    # slot fillers
    def _pick(self, words: list[str]) -> str:
        return words[self.rng.randrange(len(words))]

    def _np(self, allow_pp: bool = True) -> str:
        """Singular noun phrase: determiner, optional adjective, noun, rare prep phrase."""
        r = self.rng.random()
        if r < 0.15:
            return self._pick(NAMES)
        det = self._pick(_DETERMINERS)
        noun = self._pick(NOUNS)
        if self.rng.random() < 0.65:
            noun = self._pick(ADJECTIVES) + " " + noun
        if det == "a" and noun[0] in "aeiou":
            det = "an"
        phrase = f"{det} {noun}"
        if allow_pp and self.rng.random() < 0.12:
            phrase += f" {self._pick(_PREPOSITIONS)} the {self._pick(NOUNS)}"
        return phrase

    def _np_plural(self) -> str:
        det = self._pick(["the", "some", "many", "our", "their", "those", "these", "few"])
        noun = plural(self._pick(NOUNS))
        if self.rng.random() < 0.5:
            noun = self._pick(ADJECTIVES) + " " + noun
        return f"{det} {noun}"

    def _pp(self) -> str:
        if self.rng.random() < 0.5:
            return f"{self._pick(['in', 'at', 'near', 'behind'])} {self._pick(PLACES)}"
        return f"{self._pick(_PREPOSITIONS)} the {self._pick(NOUNS)}"

    def _maybe(self, text: str, p: float = 0.65) -> str:
        return text if self.rng.random() < p else ""

    # templates
    def _t_past_svo(self) -> str:
        return (f"{self._np()} {past(self._pick(VERBS_T))} {self._np()} "
                f"{self._maybe(self._pick(_TIMES))}")

    def _t_modal(self) -> str:
        return f"{self._np()} {self._pick(_MODALS)} {self._pick(VERBS_T)} {self._np()} " \
               f"{self._maybe(self._pp())}"

    def _t_question(self) -> str:
        return f"did {self._np()} {self._pick(VERBS_T)} {self._np()} {self._maybe(self._pp())}"

    def _t_said(self) -> str:
        return (f"{self._pick(NAMES)} said that {self._np(False)} "
                f"{past(self._pick(VERBS_I))} {self._pick(ADVERBS)}")

    def _t_plural_habit(self) -> str:
        return (f"{self._np_plural()} {self._pick(VERBS_T)} {self._np(False)} every "
                f"{self._pick(['day', 'week', 'night', 'month', 'summer', 'morning'])}")

    def _t_there_are(self) -> str:
        return (f"there are {self._pick(_NUMBERS)} {self._pick(ADJECTIVES)} "
                f"{plural(self._pick(NOUNS))} {self._pp()}")

    def _t_progressive(self) -> str:
        return f"{self._pick(NAMES)} is {gerund(self._pick(VERBS_T))} {self._np()} " \
               f"{self._maybe('in ' + self._pick(PLACES))}"

    def _t_please(self) -> str:
        return f"please {self._pick(VERBS_T)} {self._np()} {self._pp()}"

    def _t_intransitive(self) -> str:
        return f"{self._np()} {past(self._pick(VERBS_I))} {self._pp()} {self._pick(ADVERBS)}"

    def _t_two_clauses(self) -> str:
        return (f"the {self._pick(NOUNS)} was {self._pick(ADJECTIVES)} and the "
                f"{self._pick(NOUNS)} was {self._pick(ADJECTIVES)}")

    def _t_think(self) -> str:
        subj = self._pick(["i", "we", "they", "you"])
        return f"{subj} think {self._np(False)} is {self._pick(ADJECTIVES)} " \
               f"{self._maybe(self._pick(_TIMES), 0.4)}"

    def _t_pair(self) -> str:
        return (f"{self._pick(NAMES)} and {self._pick(NAMES)} {past(self._pick(VERBS_T))} "
                f"{self._np(False)} {self._maybe(self._pick(_TIMES))}")

    def _t_has(self) -> str:
        return (f"{self._pick(['my', 'her', 'his', 'the', 'our'])} {self._pick(NOUNS)} has "
                f"{self._pick(_NUMBERS)} {plural(self._pick(NOUNS))}")

    def _t_without(self) -> str:
        return f"{self._np(False)} can not {self._pick(VERBS_T)} {self._np(False)} without " \
               f"{self._np_plural()}"

    def _t_possessive(self) -> str:
        return (f"{self._pick(NAMES)}'s {self._pick(ADJECTIVES)} {self._pick(NOUNS)} "
                f"{past(self._pick(VERBS_I))} {self._pick(ADVERBS)}")

    def _t_dont(self) -> str:
        return (f"{self._pick(['i', 'we', 'they', 'you'])} don't "
                f"{self._pick(VERBS_T)} {self._np_plural()} {self._maybe(self._pp())}")

    def _t_its(self) -> str:
        return f"it's {self._pick(['too', 'very', 'quite', 'so'])} {self._pick(ADJECTIVES)} " \
               f"{self._pp()} {self._maybe(self._pick(_TIMES))}"

    def _t_when(self) -> str:
        return (f"when {self._np(False)} {past(self._pick(VERBS_I))} {self._pick(NAMES)} "
                f"{past(self._pick(VERBS_I))}")

    def _t_because(self) -> str:
        return (f"{self._pick(NAMES)} {past(self._pick(VERBS_I))} because "
                f"{self._np(False)} was {self._pick(ADJECTIVES)}")

    def _t_where(self) -> str:
        return f"where did {self._pick(NAMES)} {self._pick(VERBS_T)} {self._np()}"

    def _t_then(self) -> str:
        return (f"{self._pick(NAMES)} {past(self._pick(VERBS_I))} {self._pp()} and then "
                f"{past(self._pick(VERBS_T))} {self._np(False)}")

    def _t_but(self) -> str:
        return (f"{self._np(False)} {self._pick(_MODALS)} {self._pick(VERBS_T)} "
                f"{self._np_plural()} but {self._pick(NAMES)} {past(self._pick(VERBS_I))} "
                f"{self._pick(ADVERBS)}")

    def sentence(self) -> str:
        """One sentence of ``min_words``..``max_words`` words (redrawn until it fits)."""
        while True:
            words = self._templates[self.rng.randrange(len(self._templates))]().split()
            if self.min_words <= len(words) <= self.max_words:
                return " ".join(words)

    def __iter__(self) -> Iterator[str]:
        while True:
            yield self.sentence()

    def unique(self, n: int, exclude: frozenset[str] = frozenset()) -> list[str]:
        """``n`` distinct sentences, none in ``exclude``, in draw order."""
        seen: dict[str, None] = {}
        for s in self:
            if len(seen) == n:
                break
            if s not in exclude and s not in seen:
                seen[s] = None
        return list(seen)


def split_sentences(counts: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """Disjoint sentence lists per split, e.g. ``{"train": 2000, "dev": 200, "test": 200}``.

    One stream of distinct sentences is cut into consecutive pieces in the order of
    ``counts``, so no sentence appears in two splits.
    """
    pool = SentenceGenerator(seed).unique(sum(counts.values()))
    out: dict[str, list[str]] = {}
    start = 0
    for name, n in counts.items():
        out[name] = pool[start:start + n]
        start += n
    return out


def vocabulary() -> list[str]:
    """Every word the grammar can produce (sorted), for coverage checks and docs."""
    words: dict[str, None] = {}
    fixed = (
        " ".join(_TIMES) + " " + " ".join(_NUMBERS) + " " + " ".join(_PREPOSITIONS) + " "
        + " ".join(_DETERMINERS) + " " + " ".join(_MODALS) + " " + " ".join(PLACES)
        + " an some many those these few did said that every day week night month summer"
        " morning there are is please and was i we they you think has can not without"
        " don't it's too very quite so when because where in at near behind then but"
    )
    for w in fixed.split():
        words[w] = None
    for n in NOUNS:
        words[n] = None
        words[plural(n)] = None
    for v in VERBS_T + VERBS_I:
        for form in (v, third_person(v), past(v), gerund(v)):
            words[form] = None
    for group in (ADJECTIVES, ADVERBS, NAMES):
        for w in group:
            words[w] = None
    for name in NAMES:
        words[name + "'s"] = None
    return sorted(words)
