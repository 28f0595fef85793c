"""False-hit guards for the semantic cache.

A semantic candidate (an earlier prompt whose embedding is close to the new one) may only be served
when ``compatible(new_prompt, cached_prompt)`` says so.  Embeddings are good at "these two sentences
are about the same thing" and bad at "these two sentences ask for the same answer": "convert 5 km to
miles" and "convert 5 miles to km" are nearly identical vectors.  The guards below are cheap,
deterministic feature comparisons (regexes and small word lists, no ML, no I/O) that veto a hit
whenever a feature that changes the answer differs.  They are deliberately conservative: a false
veto costs one upstream call, a false hit serves a wrong answer.

Features are extracted once per text (LRU-cached) from ``normalise(text)``: Unicode NFKC, curly
quotes/dashes/minus folded to ASCII, whitespace collapsed.  Quoted spans are compared by ``quote``
and then masked out, so the other guards only look at the unquoted remainder.

Rules, in the order they are checked (the first failing one is the reason returned; identical texts are
always compatible):

``quote``
    The multiset of quoted spans -- ``"..."``, ``'...'`` (apostrophes inside words such as
    "what's" are not quotes), ```code``` and fenced code blocks -- must be equal, compared with
    whitespace collapsed and case folded (code is compared case-sensitively, and so is quoted
    text when the prompt is about strings, regexes, matching, passwords, keys...).  Code
    operators outside quotes (``!=``, ``==``, ``<=``, ``**``, ``&&``, ``x*2``, ``a<b``...) must agree
    too ("status = 'x'" vs "status != 'x'"); a lone ``=`` in prose ("3 tbsp = ? tsp") is not one.
    Blind spots: unquoted literals ("translate good morning to French"); a phrase quoted in one
    text and not in the other is a veto (safe, costs recall).

``number``
    The ordered sequence of numbers must be equal.  Digits (``-3``, ``2.50``, ``1,000``, ``.5``,
    numbers glued to words such as ``v2``/``ipv6``/``python3``), written-out numbers up to the
    billions ("twenty five", "a dozen"), ordinals ("third", "3rd"; "second" only as "the second",
    "second-largest", "second highest") and "half" are all values, so
    "five" == "5" == "5.0".  "one" counts only next to another number word or before a unit
    (it is usually a pronoun).  When numbers are present, arithmetic operators (``+ - * / ^``,
    "plus", "times", "sum", "product", ...) must agree as well, so "2+3" != "2*3".
    Blind spots: reordered operands of commutative operations ("3+5" vs "5+3") are vetoed (safe);
    "a couple", "several", Roman numerals and fractions written as words ("two thirds") are not
    numbers; "first" as a discourse marker ("First, ...") counts as 1 (safe, costs recall).

``unit``
    Units (length, mass, volume, temperature, time, data, speed, energy, currencies, %, am/pm) are
    canonicalised ("kilometres" == "km", "$" == "usd") and two things must agree: the multiset of
    units mentioned, and the multiset of (number, unit) quantities ("5 km" binds 5 to km, "$20"
    binds 20 to usd).  Binding catches "how many miles is 5 km" vs "convert 5 miles to km".
    Blind spots: single-letter units ("m", "g", "l", "s", "h", "C", "F") only count right after a
    number; "pound" is mass unless written "£"/"gbp"; units inside compound words are missed.

``unit`` (periods)
    Rates and periods must agree: "per hour", "/hr", "each month", "every day", "in a day",
    "monthly", "annually", and "a week" after an amount ("$2,800 a week" vs "$2,800 a month").

``negation``
    The count of negation cues must be equal: not, n't, no, never, none, nothing, nobody, nowhere,
    neither, nor, cannot, without, except, excluding, unless, instead of, rather than.
    Blind spots: lexical negation ("unsafe", "fail to", "lack", "avoid", "impossible") and double
    negatives are not understood; "No, ..." as an interjection counts (safe, costs recall).

``language``
    The set of programming languages (python, javascript/js/node, typescript, java, c, c++, c#,
    go/golang, rust, ruby, php, swift, kotlin, scala, sql, bash/shell, powershell, perl, r, ...),
    a few unambiguous technologies (django, pandas, numpy, docker, kubernetes, postgres, ...) and
    natural languages (english, french, spanish, ...) must be equal.  Ambiguous names ("go", "c",
    "r") only count in an unambiguous shape ("Go" capitalised mid-sentence, "in go", "golang",
    a standalone capital "C"/"R").
    Blind spots: frameworks not in the list, lowercase "go"/"c"/"r" used as language names in
    other shapes, dialects (python 2 vs 3 is left to the number guard).

``entity``
    Named entities must agree, case-insensitively: every capitalised token that is not at the
    start of a sentence, every acronym (``AWS``, ``GPT``, also right after a number: "8 US fluid
    ounces" vs "8 UK fluid ounces"), and sentence-initial capitalised words
    that are not common sentence starters ("Paris is ...") of one text must occur as a word in the
    other.  Texts written mostly in capitals skip the acronym rule.
    Blind spots: lowercase proper nouns ("capital of france" vs "capital of germany"),
    sentence-initial proper nouns that are also common words, entities spelled differently
    ("USA" vs "United States" is vetoed -- safe).

``direction``
    Asymmetric relations must point the same way.  Around the connectors ``to``, ``into``,
    ``->``, ``→``, ``from ... to``, ``than``, ``over``, ``towards``, ``onto`` and ``replace X with
    Y`` the content words on the source side and on the target side are collected (units and
    languages canonicalised); a word that is a source in one text and a target in the other is a
    veto.  An infinitive "to" ("the way to turn X into Y": after how/way/need/..., or before a
    common verb) is not a connector.  In addition, when both texts mention the same anchors
    (units, languages, entities, quoted spans) in a different order and either text has a real
    direction (a connector as above, or from/than/before/after/instead/rather/replace/versus/->),
    the pair is vetoed.
    And a number bound to a place must stay bound to it: "9am in London" vs "9am in Tokyo" (the
    number and the entity right after the first in/at/from/to/for/near within the next words),
    compared when both texts have such bindings. And two content words that trade places with
    everything else equal are a veto ("is a square a rectangle" vs "is a rectangle a square",
    "3pm Berlin time ... in Chicago" vs "3pm Chicago time ... in Berlin"); a number and a word
    trading places ("in England in 1066" vs "in 1066 in England") is not; plurals fold ("can cats
    eat dog food" vs "can dogs eat cat food").  For "than", the compared subject before
    "more/less ADJ" or "-er" is a source too ("is a heat pump more efficient than a gas furnace").
    Blind spots: direction expressed without a connector ("what is X in miles" vs "how many X in
    a mile") passes when no anchor repeats in a different order; "how many miles is 5 km" vs
    "convert 5 km to miles" is vetoed by the anchor order (safe, costs recall); infinitive
    detection is a word list, so an unusual verb after "to" can create a spurious direction.

``qualifier``
    Words that narrow what is asked -- when (ancient, medieval, modern, current/today, historical,
    future), for whom (child/kid, teen, beginner, expert) and in what form (brief/concise,
    detailed, "in one sentence" / "in two paragraphs" / "one-line", bullets, JSON/YAML/CSV,
    formal, casual, funny) --
    canonicalised, must be the same set in both texts ("... in Egypt" vs "... in ancient Egypt").
    Blind spots: qualifiers not in the list; a qualifier in one text only is a veto even when the
    other text implies it (safe, costs recall).

``opposite``
    A table of antonym groups (min/max, ascending/descending, increase/decrease, encrypt/decrypt,
    upload/download, before/after, buy/sell, best/worst, good/bad, closest/farthest,
    oldest/youngest and other superlatives, metric/imperial, often/rarely, ...), plus quantity (a/an/one vs
    all/every: "name a country" vs "name all the countries"), frequency (often/every day vs
    rarely/occasionally), last/next, and tense (is/are/do/does vs was/were/did vs will: "what is
    the capital" vs "what was the capital"): a veto when one text uses
    only one side of a group and the other text only the other side.
    Blind spots: antonyms not in the table; only a clean flip is vetoed, not one side vs nothing
    ("good" alone is too often filler); the tense flip also vetoes paraphrases that change tense
    ("Is X the founder of Y?" vs "Did X found Y?": safe, costs recall).

``slot``
    Same sentence frame, different filler: the two texts' word sequences share a prefix and a
    suffix covering at least half of the longer one, and differ only in one middle span of one to
    three content words on each side ("What is the *capital* of Australia?" vs "What is the
    *population* of Australia?", "How do I *bake* salmon?" vs "How do I *grill* salmon?").  This is
    the shape where embeddings are most similar and answers most different.  Likewise one or two
    content words only added to an otherwise identical text ("nearest integer" vs "nearest even
    integer"), unless they are filler ("please", "usually", "number" in "is 97 a prime number").
    Spans made of function words ("do" vs "can"), numbers/units/negations (other guards compared those) or
    listed synonyms (write/compose, centre/center, remove/delete, ...) are not vetoed.
    Blind spots: a different key word together with a rephrasing elsewhere ("What's Australia's
    population?" vs "What is the capital of Australia?") is left to the similarity threshold;
    synonym swaps not in the list are vetoed (safe, costs recall: "print" vs "output").

Cost: one ``features()`` pass is linear in the text length (~0.1 ms for a one-line prompt; windows
bound every look-behind), and features are LRU-cached, so comparing a query with k candidates costs
one extraction for the query plus k (usually cached) extractions.  Guards are symmetric.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Features", "compatible", "features", "normalise"]

# --------------------------------------------------------------------------------------------- text

_FOLD = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u00ab": '"',
        "\u00bb": '"',
        "\u2033": '"',
        "\u2212": "-",
        "\u2013": "-",
        "\u2014": " - ",
        "\u00d7": "*",
        "\u00f7": "/",
        "\u00a0": " ",
    }
)
_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    """NFKC, fold typographic quotes/dashes/minus/multiplication signs to ASCII, collapse whitespace.

    Case is preserved (the entity and language guards need it); compare with ``.casefold()``.
    """
    return _WS.sub(" ", _fold(text)).strip()


def _fold(text: str) -> str:
    t = unicodedata.normalize("NFKC", text).translate(_FOLD)
    return t.replace("\u2192", " -> ").replace("=>", " -> ")


# ------------------------------------------------------------------------------------------- quotes

_CASE_MATTERS = re.compile(
    r"\b(?:regex|regexp|regular expression|pattern|match(?:es)?|grep|sed|case|password|username|string|"
    r"variable|identifier|filename|file name|header|key|url)\b|[$^\[\]\\]",
    re.I,
)
"""Quoted text is compared case-sensitively when the prompt is about strings, code or matching ("does
^[a-z]+$ match 'Hello'" vs "'hello'"); otherwise case-folded ("carpe diem" == "Carpe diem")."""
_FENCE = re.compile(r"```(?:[\w+#-]*\n)?(.*?)```", re.S)
_BACKTICK = re.compile(r"`([^`\n]+)`")
_DQUOTE = re.compile(r'"([^"]+)"')
_SQUOTE = re.compile(r"(?<![\w'])'([^'\n]+?)'(?![\w])")


def _placeholder(k: int) -> str:
    return " QUOTED" + "".join(chr(ord("a") + int(d)) for d in str(k)) + " "


def _extract_quotes(text: str, case_sensitive: bool = False) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """Quoted spans (sorted, and in textual order) and the text with each span replaced by a placeholder."""
    spans: list[str] = []

    def code(m: re.Match[str]) -> str:
        spans.append("code:" + _WS.sub(" ", m.group(1)).strip())
        return _placeholder(len(spans) - 1)

    def prose(m: re.Match[str]) -> str:
        inner = _WS.sub(" ", m.group(1)).strip().rstrip(".!?,;:")
        if not case_sensitive:
            inner = inner.casefold()
        if not inner:
            return m.group(0)
        spans.append("text:" + inner)
        return _placeholder(len(spans) - 1)

    t = _FENCE.sub(code, text)
    t = _BACKTICK.sub(code, t)
    t = _DQUOTE.sub(prose, t)
    t = _SQUOTE.sub(prose, t)
    order = [
        spans[int("".join(str(ord(c) - ord("a")) for c in m.group(1)))]
        for m in re.finditer(r"QUOTED([a-j]+)\b", t)
    ]
    return tuple(sorted(spans)), tuple(order), t


# ------------------------------------------------------------------------------------------ numbers

_UNITS_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
    "dozen": 12,
}  # fmt: skip
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_ORDINALS = {
    "first": 1, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
    "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "twentieth": 20, "hundredth": 100,
    "half": 0.5, "halves": 0.5, "quarter": 0.25, "quarters": 0.25,
}  # fmt: skip
# "second" is absent: it is more often the time unit; `_parse_numbers` takes it as the ordinal only in
# the shapes "the second ...", "second-...", "second <superlative>".

_NUM = re.compile(
    r"(?P<neg>(?:(?<=^)|(?<=[\s(=\[,:]))-)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:st|nd|rd|th)?"
)
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9+#'.-]*[A-Za-z0-9+#]|[A-Za-z]|[$€£¥%°]|\d[\d,.]*")

_OP_SYMBOLS = re.compile(r"(?<=[\d\s)])\s*(\*\*|[-+*/^x%])\s*(?=[\d(.-])")
_OP_WORDS = {
    "plus": "+", "add": "+", "added": "+", "sum": "+", "minus": "-", "subtract": "-",
    "subtracted": "-", "difference": "-", "times": "*", "multiply": "*", "multiplied": "*",
    "product": "*", "divide": "/", "divided": "/", "quotient": "/", "over": "/", "power": "^",
    "squared": "^2", "cubed": "^3", "root": "root", "sqrt": "root", "factorial": "!",
    "modulo": "%", "mod": "%", "remainder": "%",
}  # fmt: skip
_SYMBOL_OPS = {"+": "+", "-": "-", "*": "*", "x": "*", "/": "/", "^": "^", "**": "^", "%": "%"}


def _fmt(v: float) -> str:
    return f"{v:.10g}"


# -------------------------------------------------------------------------------------------- units

_UNIT_ALIASES: dict[str, tuple[str, ...]] = {
    "km": ("km", "kms", "kilometer", "kilometers", "kilometre", "kilometres"),
    "mile": ("mi", "mile", "miles"),
    "m": ("meter", "meters", "metre", "metres"),
    "cm": ("cm", "centimeter", "centimeters", "centimetre", "centimetres"),
    "mm": ("mm", "millimeter", "millimeters", "millimetre", "millimetres"),
    "ft": ("ft", "foot", "feet"),
    "inch": ("inch", "inches"),
    "yard": ("yd", "yds", "yard", "yards"),
    "kg": ("kg", "kgs", "kilo", "kilos", "kilogram", "kilograms", "kilogramme", "kilogrammes"),
    "gram": ("gram", "grams", "gramme", "grammes", "gr"),
    "mg": ("mg", "milligram", "milligrams"),
    "lb": ("lb", "lbs", "pound", "pounds"),
    "oz": ("oz", "ounce", "ounces"),
    "stone": ("st", "stone", "stones"),
    "ton": ("ton", "tons", "tonne", "tonnes"),
    "litre": ("liter", "liters", "litre", "litres", "ltr"),
    "ml": ("ml", "milliliter", "milliliters", "millilitre", "millilitres"),
    "gallon": ("gal", "gallon", "gallons"),
    "pint": ("pint", "pints"),
    "cup": ("cup", "cups"),
    "tbsp": ("tbsp", "tablespoon", "tablespoons"),
    "tsp": ("tsp", "teaspoon", "teaspoons"),
    "celsius": ("celsius", "centigrade", "°c", "ºc", "degc"),
    "fahrenheit": ("fahrenheit", "°f", "ºf", "degf"),
    "kelvin": ("kelvin",),
    "degree": ("degree", "degrees", "deg", "°"),
    "radian": ("radian", "radians", "rad"),
    "percent": ("%", "percent", "per cent", "percentage", "pct"),
    "second": ("second", "seconds", "sec", "secs"),
    "minute": ("minute", "minutes", "min", "mins"),
    "hour": ("hour", "hours", "hr", "hrs"),
    "day": ("day", "days"),
    "week": ("week", "weeks", "wk", "wks"),
    "month": ("month", "months"),
    "year": ("year", "years", "yr", "yrs"),
    "am": ("am", "a.m."),
    "pm": ("pm", "p.m."),
    "byte": ("byte", "bytes"),
    "bit": ("bit", "bits"),
    "kb": ("kb", "kib", "kilobyte", "kilobytes"),
    "mb": ("mb", "mib", "megabyte", "megabytes"),
    "gb": ("gb", "gib", "gigabyte", "gigabytes"),
    "tb": ("tb", "tib", "terabyte", "terabytes"),
    "mph": ("mph",),
    "kmh": ("kph", "kmh", "km/h"),
    "knot": ("knot", "knots"),
    "kcal": ("kcal", "calorie", "calories", "cal"),
    "kj": ("kj", "kilojoule", "kilojoules"),
    "joule": ("joule", "joules"),
    "watt": ("watt", "watts"),
    "kw": ("kw", "kilowatt", "kilowatts"),
    "kwh": ("kwh",),
    "volt": ("volt", "volts"),
    "amp": ("amp", "amps", "ampere", "amperes"),
    "hz": ("hz", "hertz"),
    "ghz": ("ghz",),
    "acre": ("acre", "acres"),
    "hectare": ("ha", "hectare", "hectares"),
    "sqft": ("sqft", "sq ft", "square feet", "square foot"),
    "sqm": ("sqm", "m2", "square meters", "square metres", "square meter", "square metre"),
    "usd": ("$", "usd", "dollar", "dollars", "buck", "bucks", "us$"),
    "eur": ("€", "eur", "euro", "euros"),
    "gbp": ("£", "gbp", "sterling"),
    "jpy": ("¥", "jpy", "yen"),
    "inr": ("₹", "inr", "rupee", "rupees"),
    "cny": ("cny", "rmb", "yuan"),
    "chf": ("chf", "franc", "francs"),
    "cad": ("cad", "c$"),
    "aud": ("aud", "a$"),
    "btc": ("btc", "bitcoin", "bitcoins"),
    "eth": ("eth", "ether"),
    "cent": ("cent", "cents"),
    "pixel": ("px", "pixel", "pixels"),
    "pt": ("pt", "pts", "point", "points"),
    "em": ("rem",),
    "k": ("k",),
}
# Units that are ordinary words or letters: only units right after a number.
_ONLY_AFTER_NUMBER = {
    "m", "g", "l", "s", "h", "c", "f", "t", "mi", "st", "min", "mins", "sec", "am", "pm", "pt",
    "pts", "point", "points", "k", "ha", "rad", "deg", "cal", "gal", "gr", "px", "em", "rem", "cup",
    "cups", "day", "days", "week", "weeks", "month", "months", "year", "years", "second", "minute",
    "hour", "bit", "bits", "franc", "francs", "ether", "stone", "stones", "kilo", "kilos", "ton",
    "tons", "degree", "degrees", "buck", "bucks", "cent", "cents",
}  # fmt: skip
_SHORT_AFTER_NUMBER = {"m": "m", "g": "gram", "l": "litre", "s": "second", "h": "hour", "t": "ton"}
_UNIT_OF: dict[str, str] = {alias: canon for canon, aliases in _UNIT_ALIASES.items() for alias in aliases}
_CURRENCY_PREFIX = {"$": "usd", "€": "eur", "£": "gbp", "¥": "jpy", "₹": "inr", "us$": "usd", "c$": "cad"}
_MULTIWORD_UNITS = sorted((a for a in _UNIT_OF if " " in a), key=len, reverse=True)

# ---------------------------------------------------------------------------------------- negation

_NEGATIONS = {
    "not", "no", "never", "none", "nothing", "nobody", "nowhere", "neither", "nor", "cannot",
    "without", "except", "excluding", "unless", "nope",
}  # fmt: skip
_NEG_PHRASES = re.compile(r"\b(?:instead of|rather than|other than|apart from)\b")

# ---------------------------------------------------------------------------------------- languages

_LANGS: dict[str, tuple[str, ...]] = {
    "python": ("python", "python2", "python3", "py", "cpython", "pypy"),
    "javascript": ("javascript", "js", "node", "nodejs", "node.js", "ecmascript", "es6"),
    "typescript": ("typescript", "ts"),
    "java": ("java",),
    "c++": ("c++", "cpp", "cplusplus"),
    "c#": ("c#", "csharp", "c-sharp", ".net", "dotnet"),
    "go": ("golang",),
    "rust": ("rust", "rustlang"),
    "ruby": ("ruby",),
    "php": ("php",),
    "swift": ("swift",),
    "kotlin": ("kotlin",),
    "scala": ("scala",),
    "sql": ("sql", "tsql", "t-sql", "plsql", "pl/sql"),
    "bash": ("bash", "shell", "sh", "zsh", "shellscript"),
    "powershell": ("powershell",),
    "perl": ("perl",),
    "matlab": ("matlab",),
    "haskell": ("haskell",),
    "elixir": ("elixir",),
    "erlang": ("erlang",),
    "clojure": ("clojure",),
    "lua": ("lua",),
    "dart": ("dart",),
    "julia": ("julia",),
    "fortran": ("fortran",),
    "cobol": ("cobol",),
    "objective-c": ("objective-c", "objc"),
    "visual basic": ("vba", "vb.net", "vb"),
    "f#": ("f#", "fsharp"),
    "assembly": ("assembly", "asm"),
    "html": ("html", "html5"),
    "css": ("css", "css3", "scss", "sass"),
    "zig": ("zig",),
    "ocaml": ("ocaml",),
    "solidity": ("solidity",),
    "groovy": ("groovy",),
    "django": ("django",),
    "flask": ("flask",),
    "fastapi": ("fastapi",),
    "pandas": ("pandas",),
    "numpy": ("numpy",),
    "pytorch": ("pytorch", "torch"),
    "tensorflow": ("tensorflow",),
    "docker": ("docker", "dockerfile"),
    "kubernetes": ("kubernetes", "k8s", "kubectl"),
    "postgres": ("postgres", "postgresql", "psql"),
    "mysql": ("mysql", "mariadb"),
    "sqlite": ("sqlite", "sqlite3"),
    "mongodb": ("mongodb", "mongo"),
    "redis": ("redis",),
    "linux": ("linux", "ubuntu", "debian"),
    "macos": ("macos", "osx"),
    "jquery": ("jquery",),
    "english": ("english",),
    "french": ("french",),
    "spanish": ("spanish",),
    "german": ("german",),
    "italian": ("italian",),
    "portuguese": ("portuguese",),
    "dutch": ("dutch",),
    "chinese": ("chinese", "mandarin", "cantonese"),
    "japanese": ("japanese",),
    "korean": ("korean",),
    "russian": ("russian",),
    "arabic": ("arabic",),
    "hindi": ("hindi",),
    "turkish": ("turkish",),
    "greek": ("greek",),
    "polish": ("polish",),
    "swedish": ("swedish",),
    "latin": ("latin",),
    "hebrew": ("hebrew",),
    "vietnamese": ("vietnamese",),
}
_LANG_OF: dict[str, str] = {alias: canon for canon, aliases in _LANGS.items() for alias in aliases}
# Letters/words that are languages only in unambiguous shapes.
_AMBIGUOUS_LANG = re.compile(
    r"(?:(?<=\s)|(?<=^))(?:(?P<go>Go)(?=[\s,.?!)]|$)|(?P<c>C)(?![+#\w])|(?P<r>R)(?![\w]))"
)
_IN_GO = re.compile(
    r"\b(?:in|using|with|idiomatic|write|the) go\b(?!\s+(?:to|back|through|over|out|up))", re.I
)

# ----------------------------------------------------------------------------------------- entities

_STARTERS = {
    "what", "what's", "whats", "how", "how's", "why", "when", "where", "who", "who's", "which",
    "whose", "whom", "is", "are", "was", "were", "am", "can", "could", "would", "should", "will",
    "shall", "may", "might", "must", "do", "does", "did", "has", "have", "had", "please", "pls",
    "i", "i'm", "i've", "i'd", "i'll", "my", "me", "we", "we're", "our", "you", "your", "it", "it's",
    "its", "this", "that", "these", "those", "there", "there's", "here", "the", "a", "an", "any",
    "some", "tell", "give", "explain", "describe", "write", "convert", "translate", "list", "show",
    "find", "help", "make", "create", "generate", "compute", "calculate", "summarise", "summarize",
    "define", "compare", "name", "suggest", "recommend", "sort", "reverse", "get", "set", "put",
    "check", "let", "let's", "now", "also", "and", "but", "or", "so", "then", "if", "in", "on",
    "at", "for", "from", "to", "with", "by", "of", "about", "after", "before", "during", "hi",
    "hello", "hey", "thanks", "thank", "ok", "okay", "yes", "no", "not", "actually", "again",
    "quick", "question", "hmm", "well", "great", "sure", "best", "good", "fix", "use", "using",
    "add", "remove", "delete", "update", "change", "build", "run", "install", "read", "parse",
    "implement", "draft", "plan", "rewrite", "edit", "proofread", "improve", "reply", "answer",
    "solve", "simplify", "evaluate", "estimate", "send", "book", "cancel",
    "need", "want", "looking", "trying", "approximately", "roughly", "exactly", "quickly",
    "briefly", "step", "steps", "one", "each", "every", "all", "both", "either", "neither", "none",
    "nothing", "never", "always", "just", "only", "anyone", "someone", "everyone", "same",
    "another", "other", "more", "most", "less", "least", "many", "much", "few", "several",
    "difference", "between", "like", "similar", "instead", "without", "except", "assuming",
    "given", "suppose", "imagine", "consider", "note", "btw", "fyi", "lastly", "finally",
    "first", "second", "next", "ways", "tips", "ideas", "advice", "currently", "recently", "today",
    "tomorrow", "yesterday",
}  # fmt: skip
_IMPERATIVES = {
    "compose", "differentiate", "integrate", "factor", "factorise", "factorize", "expand", "outline",
    "brainstorm", "paraphrase", "classify", "identify", "refactor", "optimise", "optimize", "design",
    "prepare", "describe", "recommend", "review", "rank", "rate", "count", "extract", "format",
    "tidy", "shorten", "lengthen", "continue", "complete", "finish", "correct", "spell",
    "pronounce", "conjugate", "define", "illustrate", "sketch", "map", "validate", "verify", "prove",
    "derive", "approximate", "round", "multiply", "divide", "subtract", "sum", "average", "predict",
    "forecast", "schedule", "remind", "book", "reserve", "order", "buy", "sell", "pay", "transfer",
    "send", "email", "draft", "reply", "respond", "greet", "thank", "apologise", "apologize",
    "introduce", "pitch", "persuade", "argue", "debate", "critique", "analyse", "analyze", "assess",
    "audit", "inspect", "diagnose", "troubleshoot", "cook", "bake", "boil", "grill", "roast", "fry",
    "chop", "mix", "whisk", "blend", "season", "serve", "pack", "plan", "pick", "choose", "select",
}  # fmt: skip
_COMMON_ACRONYMS = {"I", "OK", "PS", "FYI", "ASAP", "BTW", "PLS", "AM", "PM", "TL", "DR", "TLDR", "QUOTED"}
_SENTENCE_BREAK = re.compile(r"[.!?:;\n]\s*$")

# ---------------------------------------------------------------------------------------- direction

_CONNECTORS = {"to", "into", "->", "than", "over", "towards", "onto"}
_ASYMMETRIC = {"from", "than", "before", "after", "instead", "rather", "replace", "versus", "->"}
_STOP = {
    "a", "an", "the", "some", "my", "your", "our", "their", "this", "that", "these", "those", "it",
    "is", "are", "be", "do", "does", "did", "i", "me", "we", "you", "how", "what", "what's", "can",
    "could", "would", "should", "will", "please", "way", "there", "of", "for", "in", "on", "at",
    "by", "and", "or", "want", "need", "like", "going", "have", "has", "get", "go", "from", "to",
    "into", "than", "over", "with", "using", "via", "as", "so", "just", "much", "many", "more",
    "most", "less", "any", "all", "which", "best", "good", "quick", "easy", "simple", "possible",
    "able", "trying", "try", "used", "use", "convert", "converting", "translate", "translating",
    "change", "changing", "turn", "transform", "cast", "move", "moving", "migrate", "switch", "port",
    "QUOTED", "quoted",
}  # fmt: skip
_PHRASE_END = {
    "in", "on", "at", "for", "with", "using", "via", "and", "or", "but", "please", "if", "when",
    "while", "because", "so", "?", "!", ".", ",", ";", ":", "without", "by", "then",
}  # fmt: skip

# "to" introducing an infinitive ("the way to turn X into Y") is not a direction.
_INFINITIVE_BEFORE = {
    "how", "way", "ways", "want", "wants", "wanted", "need", "needs", "like", "able", "trying", "try",
    "going", "have", "has", "had", "ought", "used", "wish", "hope", "hoping", "best", "easiest",
    "possible", "allowed", "supposed", "planning", "plan", "tips", "steps", "time", "good", "better",
    "where", "what", "when", "whether", "which", "who", "it", "ready", "safe", "ok", "okay", "fastest",
    "simplest", "quickest", "correct", "right", "proper", "idiomatic", "help", "me", "us", "him", "her",
    "them", "you", "order", "enough", "forget", "remember", "learn", "started", "start", "difficult",
    "hard", "easy", "legal", "expensive", "cheap", "required", "necessary", "advisable",
}  # fmt: skip
_VERBS = {
    "be", "do", "make", "get", "go", "have", "see", "know", "use", "write", "create", "sort",
    "reverse", "find", "learn", "build", "run", "install", "fix", "add", "remove", "turn", "convert",
    "change", "translate", "check", "compute", "calculate", "pay", "book", "travel", "fly", "drive",
    "apply", "request", "file", "reset", "cancel", "update", "read", "parse", "print", "store",
    "save", "open", "close", "start", "stop", "deal", "prepare", "improve", "avoid", "reduce",
    "increase", "pick", "choose", "cook", "bake", "keep", "say", "ask", "tell", "handle", "set",
    "test", "deploy", "debug", "call", "send", "sign", "log", "list", "count", "merge", "split",
    "join", "clean", "boil", "grill", "roast", "fry", "invest", "claim", "report", "return",
    "visit", "stay", "spend", "take", "bring", "carry", "pack", "move", "measure", "explain",
    "understand", "solve", "estimate", "negotiate", "hire", "onboard", "quit", "resign",
    "prove", "derive", "express", "represent", "load", "connect", "configure", "enable", "disable",
}  # fmt: skip

# ---------------------------------------------------------------------------------------- opposites

_OPPOSITES: tuple[tuple[frozenset[str], frozenset[str]], ...] = tuple(
    (frozenset(p.split()), frozenset(n.split()))
    for p, n in (
        ("min minimum minimal minimise minimize smallest lowest least fewest shortest",
         "max maximum maximal maximise maximize largest biggest highest most greatest longest"),
        ("ascending ascend asc increasing", "descending descend desc decreasing"),
        ("increase increases increased raise raises raised grow", "decrease decreases decreased "
         "lower lowers lowered reduce reduces reduced shrink cut"),
        ("encrypt encrypts encrypted encryption encode encodes encoded encoding serialize "
         "serialise serialization serialisation compress compressed compression zip",
         "decrypt decrypts decrypted decryption decode decodes decoded decoding deserialize "
         "deserialise deserialization deserialisation decompress decompressed decompression unzip"),
        ("upload uploads uploading uploaded", "download downloads downloading downloaded"),
        ("import imports importing imported", "export exports exporting exported"),
        ("push pushing pushed", "pull pulling pulled"),
        ("buy buying bought purchase", "sell selling sold"),
        ("before earlier prior", "after later"),
        ("best", "worst"),
        ("good", "bad"),
        ("healthy", "unhealthy"),
        ("better", "worse"),
        ("faster quicker fastest quickest", "slower slowest"),
        ("closest nearest closer nearer", "farthest furthest farther"),
        ("oldest older eldest", "youngest younger newest newer"),
        ("earliest", "latest"),
        ("heaviest heavier", "lightest lighter"),
        ("tallest taller", "shortest shorter"),
        ("richest richer", "poorest poorer"),
        ("strongest stronger", "weakest weaker"),
        ("easiest easier", "hardest harder"),
        ("wettest", "driest"),
        ("often frequently regularly lot lots every daily everyday always", "rarely barely seldom hardly "
         "occasionally sometimes"),
        ("last previous past", "next upcoming coming"),
        ("metric", "imperial"),
        # quantity: one thing vs all of them ("name a country" vs "name all the countries")
        ("a an one single", "all every"),
        # tense: "what is / do they" vs "what was / did they" (a clean flip only)
        ("do does is are", "did was were"),
        ("did was were", "will shall"),
        ("do does is are", "will shall"),
        ("cheapest cheaper", "priciest pricier"),
        ("enable enables enabled enabling", "disable disables disabled disabling"),
        ("start starts started starting", "stop stops stopped stopping"),
        ("open opens opening", "close closes closing"),
        ("add adding added insert inserting append", "remove removing removed delete deleting "
         "deleted drop"),
        ("hot hotter warm warmer", "cold colder cool cooler"),
        ("above higher", "below lower"),
        ("true", "false"),
        ("left", "right"),
        ("uppercase upper capitalise capitalize", "lowercase lower"),
        ("first", "last"),
        ("beginning start prefix leading", "end suffix trailing"),
        ("allow allows allowed whitelist allowlist", "deny denies denied block blocked blacklist "
         "blocklist"),
        ("advantages pros benefits", "disadvantages cons drawbacks downsides"),
        ("lend lending", "borrow borrowing"),
        ("import", "export"),
        ("positive", "negative"),
        ("even", "odd"),
        ("synonym synonyms", "antonym antonyms"),
        ("hire hiring", "fire firing"),
        ("north northern", "south southern"),
        ("east eastern", "west western"),
        ("inner", "outer"),
        ("login log-in", "logout log-out"),
        ("sunrise", "sunset"),
        ("arrival arrive arriving", "departure depart departing"),
        ("gain gains profit", "loss losses"),
        ("credit", "debit"),
        ("income revenue", "expense expenses expenditure"),
        ("mean average", "median"),
        ("union", "intersection"),
        ("breadth", "depth"),
        ("synchronous sync", "asynchronous async"),
        ("shallow", "deep"),
        ("private", "public"),
        ("client", "server"),
        ("sweet", "savoury savory"),
        ("boil boiling", "freeze freezing"),
        ("gain", "lose"),
        ("winter", "summer"),
    )
)  # fmt: skip

# Words that narrow what is asked (when, for whom, in what form): one text using one and the other not
# is a veto ("What language do they speak in Egypt?" vs "... in ancient Egypt?", "explain X" vs "explain
# X for a child", "in one sentence" vs "in detail"). Canonicalised so near-synonyms agree.
_QUALIFIER_OF: dict[str, str] = {
    w: canon
    for canon, ws in (
        ("ancient", "ancient antiquity"),
        ("medieval", "medieval"),
        ("modern", "modern modern-day nowadays contemporary"),
        ("current", "current currently today present-day"),
        ("historical", "historical historically originally original"),
        ("prehistoric", "prehistoric"),
        ("future", "future"),
        ("child", "child children kid kids toddler five-year-old"),
        ("teen", "teen teens teenager teenagers"),
        ("beginner", "beginner beginners novice newbie layman layperson"),
        ("expert", "expert experts advanced professional"),
        ("brief", "brief briefly concise concisely succinct"),
        ("detailed", "detailed detail thorough thoroughly comprehensive in-depth"),
        ("bullets", "bullet bullets bulleted"),
        ("json", "json"),
        ("yaml", "yaml"),
        ("csv", "csv"),
        ("formal", "formal formally professional"),
        ("informal", "informal casual casually"),
        ("funny", "funny humorous humorously joke"),
    )
    for w in ws.split()
}

_WORD = re.compile(r"[a-z][a-z'+#-]*[a-z+#]|[a-z]|->")
_POSSESSIVE = re.compile(r"'s?$")
# Rates and periods: "per month", "a week", "/hr", "annually" ("$0.01 per hour: per month?" vs "per day?").
_PERIOD_OF = {
    "second": "second", "sec": "second", "minute": "minute", "min": "minute", "hour": "hour", "hr": "hour",
    "h": "hour", "day": "day", "night": "day", "week": "week", "wk": "week", "fortnight": "fortnight",
    "month": "month", "mo": "month", "quarter": "quarter", "year": "year", "yr": "year", "annum": "year",
    "hourly": "hour", "daily": "day", "nightly": "day", "weekly": "week", "biweekly": "fortnight",
    "monthly": "month", "quarterly": "quarter", "yearly": "year", "annually": "year", "annual": "year",
}  # fmt: skip
_RATE = re.compile(
    r"(?:\b(?:per|a|an|each|every)\s+|/\s*)(second|sec|minute|min|hour|hr|h|day|night|week|wk|fortnight"
    r"|month|mo|quarter|year|yr|annum)\b"
    r"|\b(hourly|daily|nightly|weekly|biweekly|monthly|quarterly|yearly|annually)\b"
)
# Code operators outside quotes: "status = 'x'" vs "status != 'x'", "x*2" vs "x**2".
_CODE_OP = re.compile(
    r"!==?|===|==|<=|>=|<>|\*\*|&&|\|\||<<|>>|=>"
    r"|(?<=[A-Za-z_)\]])[<>*^](?=[\w(\[])|(?<=[\w)\]])[<>*^](?=[A-Za-z_(\[])"
)
_LENGTH_FORMAT = re.compile(
    r"\b(?:in|as|into|with(?:in)?|to)\s+(?:one|a|a single|two|three|four|five|\d+|\w+ or \w+)[\s-]"
    r"(sentences?|paragraphs?|lines?|bullets?|bullet points?)\b"
    r"|\b(?:one|two|three|single)-(sentence|paragraph|line)\b"
)

# ------------------------------------------------------------------------------------------- slot

_FUNCTION = {
    "a", "an", "the", "this", "that", "these", "those", "my", "your", "our", "their", "his", "her",
    "its", "it", "i", "me", "we", "us", "you", "they", "them", "he", "she", "is", "are", "was",
    "were", "be", "been", "am", "do", "does", "did", "can", "could", "would", "should", "will",
    "shall", "may", "might", "must", "what", "what's", "whats", "how", "why", "when", "where", "who",
    "which", "whose", "whom", "please", "pls", "of", "for", "in", "on", "at", "by", "to", "with",
    "from", "about", "into", "as", "and", "or", "so", "if", "some", "any", "way", "ways", "there",
    "here", "just", "really", "actually", "also", "u", "ya", "hi", "hey", "hello", "thanks", "ok",
    "okay", "s", "there's", "it's", "i'm", "i'd", "i've", "you're", "quick", "question",
    "tell", "give", "show", "explain", "describe", "know", "need", "want", "like", "get",
    "best", "good", "easiest", "simplest", "right", "correct", "proper", "possible", "one",
}  # fmt: skip
_SYNONYMS: tuple[frozenset[str], ...] = tuple(
    frozenset(g.split())
    for g in (
        "write compose draft pen", "make create build produce generate", "show display give list",
        "quick fast rapid speedy quickly fast", "big large huge", "small little tiny", "start begin",
        "buy purchase", "pick choose select", "help assist", "fix repair", "explain describe",
        "boss manager supervisor", "pan skillet", "centre center", "colour color", "favourite favorite",
        "organise organize", "optimise optimize", "summarise summarize", "analyse analyze",
        "travelling traveling", "cancelled canceled", "car automobile", "movie film", "kid child",
        "kids children", "job work", "use utilize utilise", "stop quit halt", "end finish",
        "remove delete", "find locate", "get obtain receive", "tips advice suggestions ideas",
        "trip journey", "cost price", "phone mobile cellphone smartphone", "rules regulations",
        "error bug", "method function", "folder directory", "sofa couch", "coworker colleague",
        "shop store", "mistake error", "pair go", "go pair", "need require", "app application",
    )
)  # fmt: skip
_SLOT_TOKEN = re.compile(r"[a-z0-9][a-z0-9'+#-]*")


def _slot_words(low: str) -> tuple[str, ...]:
    return tuple(t.rstrip("'-") for t in _SLOT_TOKEN.findall(low))


def _synonyms(a: str, b: str) -> bool:
    return any(a in g and b in g for g in _SYNONYMS)


def _slot_swap(wa: tuple[str, ...], wb: tuple[str, ...]) -> tuple[str, str] | None:
    """The differing middle spans when two texts share a frame and differ in one short content-word slot."""
    n = min(len(wa), len(wb))
    pre = 0
    while pre < n and wa[pre] == wb[pre]:
        pre += 1
    suf = 0
    while suf < n - pre and wa[-1 - suf] == wb[-1 - suf]:
        suf += 1
    ma, mb = wa[pre : len(wa) - suf], wb[pre : len(wb) - suf]
    shared = pre + suf
    if not (1 <= len(ma) <= 3 and 1 <= len(mb) <= 3) or shared < 2 or shared * 2 < max(len(wa), len(wb)):
        return None
    for w in (*ma, *mb):
        if w in _FUNCTION or w.startswith("quoted") or w.endswith("n't") or w in _NEGATIONS:
            return None  # function words, or a slot another guard has already compared
        if w[0].isdigit() or w in _UNITS_WORDS or w in _SCALES or w in _ORDINALS or w in _UNIT_OF:
            return None
    if len(ma) == 1 and len(mb) == 1 and _synonyms(ma[0], mb[0]):
        return None
    return " ".join(ma), " ".join(mb)


# ----------------------------------------------------------------------------------------- features


@dataclass(frozen=True, slots=True)
class Features:
    """The answer-changing features of one prompt (see the module docstring)."""

    quotes: tuple[str, ...]
    numbers: tuple[str, ...]
    operators: tuple[str, ...]
    units: tuple[str, ...]
    quantities: tuple[str, ...]
    negations: int
    languages: frozenset[str]
    entities: frozenset[str]
    words: frozenset[str]
    sources: frozenset[str]
    targets: frozenset[str]
    anchors: tuple[str, ...]
    asymmetric: bool
    opposites: tuple[tuple[bool, bool], ...]
    slot_words: tuple[str, ...]
    qualifiers: frozenset[str]
    periods: tuple[str, ...]
    code_ops: tuple[str, ...]
    bound: tuple[str, ...]
    """Each number bound to the first named entity within the next few words ("9am in London")."""


def _stem(w: str) -> str:
    """Crude plural folding for word-order checks: "cats" == "cat", "boxes" == "box"."""
    if len(w) > 4 and w.endswith("es") and w[-3] in "sxz":
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


_FILLER = frozenset(
    "please thanks thank exactly basically simply again now still real kindly ever anyway btw for me "
    "guys folks quickly generally usually typically normally properly correctly actually really just "
    "anything something exactly precisely roughly approximately here there currently number numbers "
    "value values thing things stuff ones".split()
)


_ARTICLES = frozenset({"a", "an", "the"})


def _insertion(wa: tuple[str, ...], wb: tuple[str, ...]) -> str | None:
    """One or two content words added to an otherwise identical text, nothing else changed but an
    article ("a" -> "an"): "round to the nearest integer" vs "round to the nearest even integer", "get a
    US passport" vs "get an expedited US passport", "file taxes" vs "file taxes with an extension".
    Politeness and filler ("please", "usually", "number" in "is 97 a prime number") do not count."""
    if len(wa) > len(wb):
        wa, wb = wb, wa
    if not 1 <= len(wb) - len(wa) <= 3 or len(wa) < 3:
        return None
    short = " ".join(wa)
    added: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, wa, wb, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        article_swap = tag == "replace" and i2 - i1 == 1 and wa[i1] in _ARTICLES and wb[j1] in _ARTICLES
        if tag != "insert" and not article_swap:
            return None
        added.extend(wb[j1 + (tag == "replace") : j2])
    content = [
        w for w in added
        if w not in _FUNCTION and w not in _FILLER and not w[0].isdigit() and w not in short
    ]  # a word already inside the other text ("x" in "2x") adds nothing
    return " ".join(content) if 1 <= len(content) <= 2 else None


def _transposition(wa: tuple[str, ...], wb: tuple[str, ...]) -> tuple[str, str] | None:
    """Two content words that trade places, everything else equal: "is a square a rectangle" vs "is a
    rectangle a square", "3pm Berlin time ... in Chicago" vs "3pm Chicago time ... in Berlin"."""
    if len(wa) != len(wb) or wa == wb:
        return None
    diff = [i for i, (x, y) in enumerate(zip(wa, wb, strict=True)) if x != y]
    if len(diff) != 2:
        return None
    i, j = diff
    if _stem(wa[i]) != _stem(wb[j]) or _stem(wa[j]) != _stem(wb[i]):
        return None
    if wa[i] in _FUNCTION and wa[j] in _FUNCTION:
        return None  # "what time is it" vs "what time it is"
    if wa[i][0].isdigit() != wa[j][0].isdigit():
        return None  # a number and a word trading places: "in England in 1066" vs "in 1066 in England"
    return wa[i], wa[j]


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _parse_numbers(text: str) -> tuple[list[tuple[int, int, float]], list[str]]:
    """Numbers as (start, end, value) spans, plus arithmetic operators (only meaningful with numbers)."""
    spans: list[tuple[int, int, float]] = []
    for m in _NUM.finditer(text):
        raw = m.group("num").replace(",", "")
        try:
            v = float(raw)
        except ValueError:  # pragma: no cover - the regex only matches numerals
            continue
        if m.group("neg"):
            v = -v
        spans.append((m.start(), m.end(), v))
    # Written-out numbers: scan word tokens with positions.
    words = [
        (w.start(), w.end(), w.group(0).casefold()) for w in re.finditer(r"[A-Za-z]+(?:-[A-Za-z]+)*", text)
    ]
    i = 0
    while i < len(words):
        start, end, w = words[i]
        parts = w.split("-")
        if parts[0] == "second" and (
            len(parts) > 1
            or (i > 0 and words[i - 1][2] in ("the", "my", "our", "their", "its", "his", "her"))
            or (i + 1 < len(words) and words[i + 1][2].endswith("est"))
        ):  # "the second", "second-largest", "second highest": the ordinal, not the time unit
            spans.append((start, end, 2.0))
            i += 1
            continue
        if all(p in _UNITS_WORDS or p in _SCALES for p in parts) or w in _ORDINALS:
            if w in _ORDINALS and w not in _UNITS_WORDS:
                spans.append((start, end, float(_ORDINALS[w])))
                i += 1
                continue
            total, current, j, seen = 0.0, 0.0, i, 0
            prev_end = start
            while j < len(words):
                s2, e2, w2 = words[j]
                if j > i and (text[prev_end:s2].strip() not in ("", "and", "-")):
                    break
                ps = w2.split("-")
                if w2 == "and" and seen:
                    j += 1
                    prev_end = e2
                    continue
                if not all(p in _UNITS_WORDS or p in _SCALES for p in ps):
                    break
                for p in ps:
                    if p in _SCALES:
                        current = max(current, 1.0) * _SCALES[p]
                        if _SCALES[p] >= 1000:
                            total += current
                            current = 0.0
                    else:
                        current += _UNITS_WORDS[p]
                seen += 1
                end = e2
                prev_end = e2
                j += 1
            if words[j - 1][2] == "and":
                j -= 1
            value = total + current
            if seen == 1 and w == "one":
                nxt = text[end : end + 40].lstrip().split(" ", 1)[0].casefold().strip(".,?!;:")
                prv = words[i - 1][2] if i > 0 else ""
                if nxt not in _UNIT_OF and nxt not in _OP_WORDS and prv not in _OP_WORDS and prv != "and":
                    i = j
                    continue
            if w == "dozen" and i > 0 and words[i - 1][2] in ("a", "one"):
                start = words[i - 1][0]
            spans.append((start, end, value))
            i = max(j, i + 1)
            continue
        i += 1
    spans.sort()
    ops: list[str] = []
    if spans:
        for m in _OP_SYMBOLS.finditer(text):
            sym = m.group(1)
            if sym == "x" and not re.search(r"\d\s*x\s*\d", text[max(0, m.start() - 3) : m.end() + 3]):
                continue
            if sym == "%":
                continue
            ops.append(_SYMBOL_OPS[sym])
        for w in re.findall(r"[a-z]+", text.casefold()):
            if w in _OP_WORDS:
                ops.append(_OP_WORDS[w])
        if re.search(r"square root", text, re.I):
            ops.append("root")
    return spans, ops


def _parse_units(text: str, spans: list[tuple[int, int, float]]) -> tuple[list[str], list[str]]:
    """All units mentioned, and (number, unit) quantities."""
    low = text.casefold()
    units: list[str] = []
    quantities: list[str] = []
    bound: set[int] = set()  # positions of unit tokens consumed by a quantity
    for start, end, value in spans:
        # Currency prefix: "$20", "£ 5", "us$3".
        raw_before = low[max(0, start - 3) : start]
        before = raw_before.rstrip()
        for pre, canon in _CURRENCY_PREFIX.items():
            if before.endswith(pre):
                quantities.append(f"{_fmt(value)} {canon}")
                units.append(canon)
                bound.add(start - (len(raw_before) - len(before)) - 1)
                break
        else:
            rest = text[end : end + 40]
            m = re.match(r"\s*(°\s*[CFcf]\b|[A-Za-z$€£¥%°][A-Za-z./0-9]*)", rest)
            if not m:
                continue
            raw = m.group(1).replace(" ", "")
            tok = raw.casefold().rstrip(".,")
            canon = None
            for mw in _MULTIWORD_UNITS:
                if low[end : end + 40].lstrip().startswith(mw):
                    canon = _UNIT_OF[mw]
                    break
            if canon is None:
                if tok in _UNIT_OF:
                    canon = _UNIT_OF[tok]
                elif raw in ("C", "F") or raw.casefold() in ("°c", "°f"):
                    canon = "celsius" if raw.casefold().endswith("c") else "fahrenheit"
                elif tok in _SHORT_AFTER_NUMBER:
                    canon = _SHORT_AFTER_NUMBER[tok]
                elif tok.startswith("°") and len(tok) == 1:
                    canon = "degree"
            if canon is None:
                continue
            # "30 degrees celsius": prefer the more specific unit.
            if canon == "degree":
                tail = low[end + m.end() : end + m.end() + 40]
                after = tail.lstrip()
                for spec in ("celsius", "centigrade", "fahrenheit", "kelvin", "c ", "f "):
                    if after.startswith(spec) or after == spec.strip():
                        canon = _UNIT_OF.get(spec.strip(), "celsius" if spec[0] == "c" else "fahrenheit")
                        bound.add(end + m.end() + len(tail) - len(after))
                        break
            quantities.append(f"{_fmt(value)} {canon}")
            units.append(canon)
            bound.add(end + m.start(1))
    # Free-standing unit words ("... to miles", "in celsius", "in euros").
    for m in re.finditer(r"[a-z$€£¥%°₹][a-z./0-9]*|[$€£¥%₹]", low):
        tok = m.group(0).rstrip(".,")
        if m.start() in bound or tok not in _UNIT_OF or tok in _ONLY_AFTER_NUMBER:
            continue
        if tok in "$€£¥₹%" and any(abs(m.start() - b) <= 2 for b in bound):
            continue
        # Skip unit words already bound to a number right before them.
        prefix = low[max(0, m.start() - 40) : m.start()].rstrip()
        if prefix and (prefix[-1].isdigit() or prefix.endswith("°")):
            continue
        units.append(_UNIT_OF[tok])
    for mw in _MULTIWORD_UNITS:
        for m in re.finditer(r"\b" + re.escape(mw) + r"\b", low):
            prefix = low[max(0, m.start() - 40) : m.start()].rstrip()
            if not (prefix and prefix[-1].isdigit()):
                units.append(_UNIT_OF[mw])
    return units, quantities


def _languages(text: str) -> set[str]:
    out: set[str] = set()
    for tok in re.findall(r"[A-Za-z.][A-Za-z0-9+#./-]*[A-Za-z0-9+#]|[A-Za-z]", text):
        t = tok.casefold().rstrip(".")
        if t in _LANG_OF:
            out.add(_LANG_OF[t])
        elif t.endswith("'s") and t[:-2] in _LANG_OF:
            out.add(_LANG_OF[t[:-2]])
    # C / R / Go only as standalone capitals (not at sentence start for Go).
    for m in _AMBIGUOUS_LANG.finditer(text):
        prefix = text[max(0, m.start() - 80) : m.start()]
        if m.group("go"):
            if prefix.strip() and not _SENTENCE_BREAK.search(prefix):
                out.add("go")
        elif m.group("c"):
            if not re.search(r"[\d°]\s*$", prefix):
                out.add("c")
        elif m.group("r"):
            out.add("r")
    if _IN_GO.search(text):
        out.add("go")
    return out


def _entities(text: str) -> set[str]:
    toks = list(re.finditer(r"[A-Za-z][A-Za-z0-9'&.-]*[A-Za-z0-9]|[A-Za-z]", text))
    alpha = [t.group(0) for t in toks]
    shouting = bool(alpha) and sum(1 for a in alpha if a.isupper() and len(a) > 1) > 0.5 * len(alpha)
    out: set[str] = set()
    for m in toks:
        w = m.group(0)
        if w.endswith("'s"):
            w = w[:-2]
        w = w.rstrip(".")
        low = w.casefold()
        if low.startswith("i'"):
            continue
        if not w or low in _LANG_OF or low in _UNIT_OF or w in _COMMON_ACRONYMS or w.startswith("QUOTED"):
            continue
        prefix = text[max(0, m.start() - 80) : m.start()]
        after_number = re.search(r"[\d°]\s*$", prefix) is not None
        unit_letter = low in _ONLY_AFTER_NUMBER or low in _SHORT_AFTER_NUMBER
        if low in ("go", "c", "r") or (len(w) <= 2 and after_number and unit_letter):
            continue  # language names (language guard) and unit letters after numbers (unit guard)
        stripped = prefix.rstrip()
        if stripped:
            at_start = bool(_SENTENCE_BREAK.search(prefix)) or stripped[-1] in "\"'(-*"
        else:
            at_start = m.start() <= 80
        if len(w) > 1 and w.isupper() and any(c.isalpha() for c in w):
            if not shouting:
                out.add(low)
            continue
        if not w[0].isupper():
            continue
        if shouting:
            continue
        if at_start and (low in _STARTERS or low in _VERBS or low in _IMPERATIVES or low.endswith("ing")):
            continue
        if low in _STOP and at_start:
            continue
        out.add(low)
    return out


def _direction(low: str, entities: set[str]) -> tuple[set[str], set[str]]:
    words = _WORD.findall(low.replace("?", " ? ").replace(",", " , "))
    words = [_UNIT_OF.get(w, _LANG_OF.get(w, w)) for w in words]
    sources: set[str] = set()
    targets: set[str] = set()

    def content(seq: list[str]) -> list[str]:
        return [
            w
            for w in seq
            if w not in _STOP and w not in _NEGATIONS and len(w) > 1 and not w.startswith("quoted")
        ]

    for i, w in enumerate(words):
        if w in ("replace", "replacing", "swap") and "with" in words[i + 1 : i + 6]:
            j = words.index("with", i + 1)
            sources.update(content(words[i + 1 : j]))
            tgt: list[str] = []
            for x in words[j + 1 : j + 5]:
                if x in _PHRASE_END:
                    break
                tgt.append(x)
            targets.update(content(tgt)[:3])
        if w not in _CONNECTORS:
            continue
        if w == "to" and (
            (i > 0 and words[i - 1] in _INFINITIVE_BEFORE) or (i + 1 < len(words) and words[i + 1] in _VERBS)
        ):
            continue
        # Target: up to three content words after the connector.
        tgt = []
        for x in words[i + 1 : i + 5]:
            if x in _PHRASE_END or x in _CONNECTORS:
                break
            tgt.append(x)
        tgt_c = content(tgt)[:3]
        # Source: the words after a nearby "from", else the one or two content words before.
        window = words[max(0, i - 6) : i]
        if "from" in window:
            k = len(window) - 1 - window[::-1].index("from")
            src_c = content(window[k + 1 :])
        else:
            src_c = []
            for x in reversed(window):
                if x in _PHRASE_END or x in _CONNECTORS:
                    break
                if x in _STOP or len(x) <= 1:
                    if src_c:
                        break
                    continue
                src_c.insert(0, x)
                if len(src_c) == 2:
                    break
        if w == "to" and not tgt_c:
            continue
        if w == "than":  # "is X more efficient than Y": X is compared with Y, not only the adjective
            k = i - 1
            while k > 0 and words[k] not in ("more", "less") and not words[k].endswith("er"):
                k -= 1
            if k > 0 and i - k <= 3:
                for x in reversed(words[max(0, k - 4) : k]):
                    if x in _PHRASE_END or x in ("is", "are", "was", "were", "does", "do", "did"):
                        break
                    if x not in _STOP and len(x) > 1:
                        src_c.append(x)
        sources.update(src_c)
        targets.update(tgt_c)
    return sources, targets


@lru_cache(maxsize=8192)
def features(text: str) -> Features:
    """Extract the guard features of one prompt (cached: a query is compared with many candidates)."""
    folded = _fold(text)
    quotes, quote_order, rest = _extract_quotes(folded, case_sensitive=bool(_CASE_MATTERS.search(folded)))
    rest = _WS.sub(" ", rest).strip()
    spans, ops = _parse_numbers(rest)
    units, quantities = _parse_units(rest, spans)
    low = rest.casefold()
    words_list = _WORD.findall(low)
    negations = sum(1 for w in words_list if w in _NEGATIONS or w.endswith("n't"))
    negations += len(_NEG_PHRASES.findall(low))
    languages = _languages(rest)
    entities = _entities(rest)
    sources, targets = _direction(low, entities)
    anchor_set = set(units) | languages | entities
    anchors: list[str] = []
    qi = iter(quote_order)
    for w in _WORD.findall(low):
        if w.startswith("quoted") and w[6:].isalpha():
            canon = next(qi, w)
        else:
            canon = _UNIT_OF.get(w, _LANG_OF.get(w, w))
            if canon not in anchor_set:
                continue
        if canon not in anchors:
            anchors.append(canon)
    raw_words = {w.rstrip(".") for w in re.findall(r"[a-z0-9][a-z0-9'&.-]*", low)}
    raw_words |= {w[:-2] for w in raw_words if w.endswith("'s")}
    words = frozenset(_UNIT_OF.get(w, w) for w in _WORD.findall(low)) | frozenset(raw_words)
    word_set = set(words_list)
    opposites = tuple((bool(p & word_set), bool(n & word_set)) for p, n in _OPPOSITES)
    return Features(
        quotes=quotes,
        numbers=tuple(_fmt(v) for _, _, v in spans),
        operators=tuple(sorted(ops)),
        units=tuple(sorted(units)),
        quantities=tuple(sorted(quantities)),
        negations=negations,
        languages=frozenset(languages),
        entities=frozenset(entities),
        words=words,
        sources=frozenset(sources),
        targets=frozenset(targets),
        anchors=tuple(anchors),
        asymmetric=bool(sources or targets or (_ASYMMETRIC & word_set)) or "->" in low,
        opposites=opposites,
        slot_words=_slot_words(low),
        qualifiers=frozenset(
            _QUALIFIER_OF[q] for w in word_set if (q := _POSSESSIVE.sub("", w)) in _QUALIFIER_OF
        ) | {(m.group(1) or m.group(2)).removesuffix("s") for m in _LENGTH_FORMAT.finditer(low)},
        bound=_bind(rest, spans, entities) if len(entities) >= 2 else (),
        periods=_periods(low),
        code_ops=tuple(sorted(m.group(0).strip() for m in _CODE_OP.finditer(rest))),
    )


_AMOUNT_BEFORE = re.compile(r"\d|\btimes?\b|\bonce\b|\btwice\b")


def _periods(low: str) -> tuple[str, ...]:
    """Rates and periods: "per hour", "/hr", "each month", "in a day", "monthly"; "a week" only after an
    amount ("$2,800 a week", "3 times a day"; not "a week of hiking")."""
    out: list[str] = []
    for m in _RATE.finditer(low):
        word = m.group(1) or m.group(2)
        lead = m.group(0).split(None, 1)[0] if m.group(1) else ""
        if lead in ("a", "an"):
            before = low[max(0, m.start() - 25) : m.start()]
            if not before.endswith("in ") and not _AMOUNT_BEFORE.search(before):
                continue
        out.append(_PERIOD_OF[word])
    return tuple(sorted(out))


def _bind(rest: str, spans: list[tuple[int, int, float]], entities: set[str]) -> tuple[str, ...]:
    """(number, place) pairs: a number and the entity right after the first of in/at/from/to/for/near
    among the next four words ("9am in London", "5 km from Paris")."""
    out: list[str] = []
    for _, end, value in spans:
        words = _WORD.findall(rest[end : end + 60].casefold())[:5]
        for i, w in enumerate(words[:-1]):
            if w in _PLACE_PREPOSITIONS:
                if words[i + 1] in entities:
                    out.append(f"{_fmt(value)}@{words[i + 1]}")
                break
    return tuple(sorted(out))


_PLACE_PREPOSITIONS = frozenset({"in", "at", "from", "to", "for", "near"})


def _missing_entities(fa: Features, fb: Features) -> set[str]:
    missing = {e for e in fa.entities if e not in fb.words and e.replace(".", "") not in fb.words}
    missing |= {e for e in fb.entities if e not in fa.words and e.replace(".", "") not in fa.words}
    return missing


def _quotes_unquoted(a: str, fa: Features, b: str, fb: Features) -> bool:
    """The same literals, quoted in one text and written plainly in the other ("what does 'carpe diem'
    mean" vs "meaning of carpe diem"): every quoted prose span of each text occurs in the other text as
    it stands (case-folded). Code spans must be quoted the same way in both."""
    if any(q.startswith("code:") for q in (*fa.quotes, *fb.quotes)):
        return False
    ta, tb = _WS.sub(" ", _fold(a)), _WS.sub(" ", _fold(b))
    if not (_CASE_MATTERS.search(ta) or _CASE_MATTERS.search(tb)):
        ta, tb = ta.casefold(), tb.casefold()
    return all(q[5:] in tb for q in fa.quotes) and all(q[5:] in ta for q in fb.quotes)


def compatible(a: str, b: str) -> tuple[bool, str | None]:
    """May the answer to prompt ``a`` be served for prompt ``b``?  ``(ok, reason_when_not)``."""
    if a == b:
        return True, None
    fa, fb = features(a), features(b)
    if fa.quotes != fb.quotes and not _quotes_unquoted(a, fa, b, fb):
        return False, f"quote: {list(fa.quotes)} != {list(fb.quotes)}"
    if fa.numbers != fb.numbers:
        return False, f"number: {list(fa.numbers)} != {list(fb.numbers)}"
    if fa.numbers and fa.operators != fb.operators:
        return False, f"number: operators {list(fa.operators)} != {list(fb.operators)}"
    if fa.units != fb.units:
        return False, f"unit: {list(fa.units)} != {list(fb.units)}"
    if fa.quantities != fb.quantities:
        return False, f"unit: {list(fa.quantities)} != {list(fb.quantities)}"
    if fa.periods != fb.periods:
        return False, f"unit: periods {list(fa.periods)} != {list(fb.periods)}"
    if fa.code_ops != fb.code_ops:
        return False, f"quote: operators {list(fa.code_ops)} != {list(fb.code_ops)}"
    if fa.negations != fb.negations:
        return False, f"negation: {fa.negations} != {fb.negations} negation cue(s)"
    if fa.languages != fb.languages:
        return False, f"language: {sorted(fa.languages)} != {sorted(fb.languages)}"
    missing = _missing_entities(fa, fb)
    if missing:
        return False, f"entity: {sorted(missing)} not in both"
    flipped = (fa.sources & fb.targets) | (fa.targets & fb.sources)
    if flipped:
        return False, f"direction: {sorted(flipped)} is a source in one and a target in the other"
    if fa.bound and fb.bound and fa.bound != fb.bound:
        return False, f"direction: quantities bound to {list(fa.bound)} != {list(fb.bound)}"
    if (
        (fa.asymmetric or fb.asymmetric)
        and len(fa.anchors) >= 2
        and sorted(fa.anchors) == sorted(fb.anchors)
        and fa.anchors != fb.anchors
    ):
        return False, f"direction: order {list(fa.anchors)} != {list(fb.anchors)}"
    if fa.qualifiers != fb.qualifiers:
        return False, f"qualifier: {sorted(fa.qualifiers)} != {sorted(fb.qualifiers)}"
    for (pa, na), (pb, nb), (pos, neg) in zip(fa.opposites, fb.opposites, _OPPOSITES, strict=True):
        if (pa and not na and nb and not pb) or (na and not pa and pb and not nb):
            return False, f"opposite: {'/'.join(sorted(pos))[:40]} vs {'/'.join(sorted(neg))[:40]}"
    pair = _transposition(fa.slot_words, fb.slot_words)
    if pair is not None:
        return False, f"direction: {pair[0]!r} and {pair[1]!r} swap places"
    inserted = _insertion(fa.slot_words, fb.slot_words)
    if inserted is not None:
        return False, f"slot: {inserted!r} added to the same sentence"
    swap = _slot_swap(fa.slot_words, fb.slot_words)
    if swap is not None:
        return False, f"slot: {swap[0]!r} vs {swap[1]!r} in the same sentence frame"
    return True, None
