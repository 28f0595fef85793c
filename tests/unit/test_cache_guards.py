"""Semantic-cache false-hit guards: each guard vetoes what it must and lets true paraphrases through."""

from __future__ import annotations

import time

import pytest

from gateway.cache.guards import compatible, features, normalise


def _ok(a: str, b: str) -> None:
    ok, reason = compatible(a, b)
    assert ok, f"{a!r} vs {b!r} vetoed: {reason}"
    assert compatible(b, a)[0], "guards must be symmetric"


def _veto(a: str, b: str, kind: str) -> None:
    ok, reason = compatible(a, b)
    assert not ok, f"{a!r} vs {b!r} should not share an answer"
    assert reason is not None and reason.startswith(kind), reason
    assert not compatible(b, a)[0], "guards must be symmetric"


# ------------------------------------------------------------------------------------------ classics


def test_classic_false_hits_are_vetoed() -> None:
    _veto("convert 5 km to miles", "convert 5 miles to km", "unit")
    _veto("What is 1+1?", "Hello world", "number")
    _veto("Translate 'good morning' to French", "Translate 'good night' to French", "quote")
    _veto("Is Paris the capital of France?", "Is Paris not the capital of France?", "negation")
    _veto("Sort a list in Python", "Sort a list in Java", "language")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I reverse a list in Python?", "What's the way to reverse a Python list?"),
        ("Explain recursion", "Can you explain recursion?"),
        ("Why doesn't my code compile?", "Why won't my code compile?"),
        ("Can I bring a laptop on the plane?", "Am I allowed to take my laptop on a plane?"),
        ("What is the capital of Australia?", "What's Australia's capital city?"),
        (
            "How do I convert a string to an integer in Python?",
            "What's the way to turn a string into an int in python?",
        ),
        ("Convert 5 km to miles", "Please convert 5 kilometres to miles."),
        ("What is 1+1?", "What's one plus one?"),
        ("What is twenty five percent of 80?", "What is 25% of 80?"),
        ("What's 30°C in Fahrenheit?", "What is 30 degrees Celsius in fahrenheit?"),
        ("how do i make pancakes", "What's a good way to make pancakes?"),
        ("Summarise the plot of Hamlet", "Give me a summary of the plot of Hamlet."),
    ],
)
def test_true_paraphrases_are_compatible(a: str, b: str) -> None:
    _ok(a, b)


def test_identical_prompts_are_compatible() -> None:
    assert compatible("anything at all: 5 km", "anything at all: 5 km") == (True, None)


# -------------------------------------------------------------------------------------------- guards


def test_numbers() -> None:
    _veto("What is 15% of 200?", "What is 15% of 300?", "number")
    _veto("Is 17 a prime number?", "Is 21 a prime number?", "number")
    _veto("What is 2.5 times 4?", "What is 2.05 times 4?", "number")
    _veto("What is -3 squared?", "What is 3 squared?", "number")
    _veto("Give me five tips for sleeping better", "Give me ten tips for sleeping better", "number")
    _veto("What happened in the third chapter?", "What happened in the fourth chapter?", "number")
    _veto("What is 10 divided by 2?", "What is 2 divided by 10?", "number")
    _veto("What is 2+3?", "What is 2*3?", "number")
    _veto("Upgrade from Python 3.11", "Upgrade from Python 3.12", "number")
    _ok("Give me five tips for sleeping better", "Give me 5 tips to sleep better")
    _ok("What happened in the 3rd chapter?", "What happened in the third chapter?")
    _ok("What's 1,000 times 3?", "What is 1000 times 3?")
    _ok("Which one is better, tea or coffee?", "Which is better: tea or coffee?")
    assert features("It costs -4.50 or 1,200").numbers == ("-4.5", "1200")
    assert features("twenty-five thousand and three").numbers == ("25003",)


def test_units() -> None:
    _veto("How long does it take to walk 5 km?", "How long does it take to walk 5 miles?", "unit")
    _veto("Convert 100 USD to EUR", "Convert 100 EUR to USD", "unit")
    _veto("Is 30°C hot?", "Is 30°F hot?", "unit")
    _veto("How many calories in 100 g of rice?", "How many calories in 100 kg of rice?", "unit")
    _veto("What is $20 in pounds?", "What is €20 in pounds?", "unit")
    _veto("Bake for 20 minutes", "Bake for 20 hours", "unit")
    _ok("Convert 100 USD to EUR", "Convert $100 to euros")
    _ok("How heavy is 3 kg in lb?", "How heavy is 3 kilograms in pounds?")
    assert features("3.5GB of RAM and 5km").quantities == ("3.5 gb", "5 km")


def test_quotes() -> None:
    _veto('What does "carpe diem" mean?', 'What does "carpe noctem" mean?', "quote")
    _veto("What does `git stash pop` do?", "What does `git stash drop` do?", "quote")
    _veto("Translate 'thank you' to German", "Translate 'thank you very much' to German", "quote")
    _ok('What does "carpe diem" mean?', "What is the meaning of 'Carpe diem'?")
    _ok(
        "What's the difference between a list and a tuple?",
        "What is the difference between a list and a tuple?",
    )
    assert features("it's John's 'pet project'").quotes == ("text:pet project",)
    assert features("```py\nx = 1\n```").quotes == ("code:x = 1",)


def test_negation() -> None:
    _veto("Which foods are safe for dogs?", "Which foods are not safe for dogs?", "negation")
    _veto("Can I take ibuprofen with coffee?", "Can I take ibuprofen without coffee?", "negation")
    _veto("List all fruits except apples", "List all fruits including apples", "negation")
    _veto("Why does my script run?", "Why doesn't my script run?", "negation")
    _veto("Should I ever reuse passwords?", "Should I never reuse passwords?", "negation")
    _ok("Why isn't my script running?", "Why is my script not running?")


def test_direction() -> None:
    _veto("Flights from New York to Los Angeles", "Flights from Los Angeles to New York", "direction")
    _veto(
        "How to convert a string to an int in Java", "How to convert an int to a string in Java", "direction"
    )
    _veto("Is Python faster than Java?", "Is Java faster than Python?", "direction")
    _veto("Port this function from Rust to Go", "Port this function from Go to Rust", "direction")
    _veto("Convert celsius to fahrenheit", "Convert fahrenheit to celsius", "direction")
    _veto("Translate this from English to Spanish", "Translate this from Spanish to English", "direction")
    _veto("Replace tabs with spaces", "Replace spaces with tabs", "direction")
    _veto("Convert a list to a dict", "Convert a dict into a list", "direction")
    _ok("Convert celsius to fahrenheit", "How do I convert from celsius to fahrenheit?")
    _ok("Train from Berlin to Munich", "Is there a train from Berlin to Munich?")


def test_entities() -> None:
    _veto("What is the population of Canada?", "What is the population of Mexico?", "entity")
    _veto("How do I create a bucket on AWS?", "How do I create a storage bucket on GCP?", "entity")
    _veto("Who wrote Hamlet?", "Who wrote Macbeth?", "entity")
    _veto("Paris is in which country?", "Lyon is in which country?", "entity")
    _ok("Who painted the Mona Lisa?", "Who was the painter of the mona lisa?")
    _ok("WHAT IS THE BEST WAY TO LEARN", "what is the best way to learn")


def test_programming_languages() -> None:
    _veto("How do I read a file in Go?", "How do I read a file in Rust?", "language")
    _veto("Explain pointers in C", "Explain pointers in C++", "language")
    _veto("How to parse JSON in javascript", "How to parse JSON in typescript", "language")
    _veto("Write a hello world in C#", "Write a hello world in Java", "language")
    _veto("How do I loop over files in bash?", "How do I loop over files in powershell?", "language")
    _veto("Say hello in French", "Say hello in Spanish", "language")
    _ok("How do I read a file in Go?", "What's the idiomatic way to read a file in golang?")
    _ok("Let's go to the beach", "Let's go to the beach!")
    assert features("Go on, explain closures in JS").languages == frozenset({"javascript"})
    assert features("Heat it to 30 C").languages == frozenset()


def test_opposites() -> None:
    _veto("Sort the array in ascending order", "Sort the array in descending order", "opposite")
    _veto("How do I encrypt a file with openssl?", "How do I decrypt a file with openssl?", "opposite")
    _veto("What is the maximum value in a list?", "What is the minimum value in a list?", "opposite")
    _veto("Should I stretch before running?", "Should I stretch after running?", "opposite")


def test_normalise_folds_typography() -> None:
    assert normalise("  \u201cHi\u201d  it\u2019s\u00a0 5 \u2212 3 ") == '"Hi" it\'s 5 - 3'


def test_guards_are_fast() -> None:
    prompts = [f"How do I convert {i} km to miles in Python without numpy?" for i in range(2000)]
    t0 = time.perf_counter()
    for p in prompts:
        compatible(p, "How do I convert 5 km to miles in Python without numpy?")
    per_call = (time.perf_counter() - t0) / len(prompts)
    assert per_call < 0.002, f"{per_call * 1e6:.0f} µs per comparison"


def test_slot_swaps() -> None:
    _veto("What is the capital of Australia?", "What is the population of Australia?", "slot")
    _veto("How do I bake salmon?", "How do I grill salmon?", "slot")
    _veto(
        "Give me a recipe for chocolate chip cookies.", "Give me a recipe for oatmeal raisin cookies.", "slot"
    )
    _veto("what is the capital of france", "what is the capital of germany", "slot")
    _ok("How do I update the app?", "How can I update the app?")
    _ok("Write a haiku about autumn.", "Compose a haiku about autumn.")
    _ok("How do I centre a div?", "How do I center a div?")


@pytest.mark.parametrize(
    "text",
    ["x" * 100_000, "'" + "a " * 50_000, "1," * 20_000, "C " * 30_000, "5 km " * 20_000, "to a " * 20_000],
)
def test_adversarial_long_inputs_stay_linear(text: str) -> None:
    t0 = time.perf_counter()
    compatible(text, text + " ?")
    assert time.perf_counter() - t0 < 5.0


def test_garbage_never_raises() -> None:
    import random

    rng = random.Random(7)
    alphabet = "ab C Go R 5 -.,'\"`°€£$%\u2192\u2212\u00d7:?!\n" + "five one dozen km to from than not"
    for _ in range(500):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        ok, reason = compatible(a, b)
        assert ok or reason


# ------------------------------------------------- rules added after the first holdout set (see eval/)


@pytest.mark.parametrize(
    ("a", "b", "kind"),
    [
        ("Which planet is closest to the sun?", "Which planet is farthest from the sun?", "opposite"),
        ("Who is the oldest person alive?", "Who is the youngest person alive?", "opposite"),
        ("Which is the heaviest element?", "Which is the lightest element?", "opposite"),
        ("Is coffee good for you?", "Is coffee bad for you?", "opposite"),
        ("Name a country in South America.", "Name all the countries in South America.", "opposite"),
        ("What is the capital of Germany?", "What was the capital of Germany?", "opposite"),
        ("What language do they speak in Egypt?", "What language is spoken in ancient Egypt?", "qualifier"),
        ("Explain photosynthesis.", "Explain photosynthesis to a kid.", "qualifier"),
        ("Summarise the French revolution in one sentence.", "Summarise the French revolution in detail.",
         "qualifier"),
        ("Write a formal email to my landlord.", "Write a casual email to my landlord.", "qualifier"),
        ("Convert 8 US fluid ounces to milliliters.", "Convert 8 UK fluid ounces to milliliters.", "entity"),
        ("If it's 9am in London, what time is it in Tokyo?",
         "If it's 9am in Tokyo, what time is it in London?", "direction"),
        ("Is a square a rectangle?", "Is a rectangle a square?", "direction"),
        ("The call is at 3pm Berlin time; what time is that in Chicago?",
         "The call is at 3pm Chicago time; what time is that in Berlin?", "direction"),
        ("SQL query to find the highest salary", "SQL query to find the second highest salary", "number"),
        ("Should I lease or buy if I drive a lot?", "Should I lease or buy if I rarely drive?", "opposite"),
        ("Summarise the article in one sentence", "Summarise the article", "qualifier"),
        ("It costs $0.01 per hour. How much is that per month?",
         "It costs $0.01 per hour. How much is that per day?", "unit"),
        ("I make $2,800 a week, what's that annually?",
         "I make $2,800 a month, what's that annually?", "unit"),
        ("Explain: SELECT * FROM t WHERE status = 'x';",
         "Explain: SELECT * FROM t WHERE status != 'x';", "quote"),
        ("What does [x*2 for x in range(5)] give?", "What does [x**2 for x in range(5)] give?", "quote"),
        ("Does the regex ^[a-z]+$ match 'Hello'?", "Does the regex ^[a-z]+$ match 'hello'?", "quote"),
        ("What does 'carpe diem' mean?", "meaning of carpe noctem", "quote"),
        ("What does `git stash pop` do?", "what does git stash pop do", "quote"),
        ("Can cats eat dog food?", "Can dogs eat cat food?", "direction"),
        ("Is a heat pump more efficient than a gas furnace?",
         "Is a gas furnace more efficient than a heat pump?", "direction"),
        ("Round 2.5 to the nearest integer.", "Round 2.5 to the nearest even integer.", "slot"),
        ("How long does it take to get a US passport?",
         "How long does it take to get an expedited US passport?", "slot"),
        ("Should I commit my .env file to git?", "Should I commit my .env.example file to git?", "slot"),
        ("Can a type O donor give blood to a type A recipient?",
         "Can a type A donor give blood to a type O recipient?", "direction"),
        ("Is it ok to give my dog cheese occasionally?", "Is it ok to give my dog cheese every day?", "unit"),
        ("When was the comet last visible?", "When will the comet next be visible?", "opposite"),
    ],
)
def test_later_rules_veto(a: str, b: str, kind: str) -> None:
    _veto(a, b, kind)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What time is it in Tokyo when it's 9am in London?",
         "If it's 9am in London, what time is it in Tokyo?"),
        ("Who won the 1966 FIFA World Cup?", "Which country won the FIFA World Cup in 1966?"),
        ("In JavaScript, how can I get the current date?", "Show me how to get today's date in JavaScript."),
        ("What does REST stand for?", "What is REST short for?"),
        ("What is a hash table?", "explain hash tables"),
        ("Ideas for a kid's birthday party?", "Can you suggest some kids' birthday party ideas?"),
        ("Give me a list of all the planets", "List every planet"),
        ("What's a good way to sort a list in Python?", "How should I sort a list in Python?"),
        ("What happened in England in 1066?", "what happened in 1066 in england"),
        ("Please proofread this sentence: 'Their going home.'", "Fix the grammar in: 'Their going home.'"),
        ("quick question: how do I undo a commit?", "how do I undo a commit"),
        ("How do I convert a PDF to Word?", "What's the way to turn a PDF into a Word document?"),
        ("Is 97 a prime number?", "is 97 prime"),
        ("Solve 2x + 6 = 10.", "Solve for x: 2x + 6 = 10"),
        ("How can I reduce my monthly grocery bill?", "ways to spend less on groceries each month"),
        ("What should I pack for a week of hiking?", "What do I need to pack for a hiking week?"),
        ("What is 15% of 200?", "Calculate 15 percent of 200."),
        ("How many teaspoons are in 3 tablespoons?", "3 tablespoons = how many teaspoons?"),
        ('What does "carpe diem" mean?', "What is the meaning of 'Carpe diem'?"),
        ("How do I reverse a list in Python?", "How do I reverse a list in Python, please?"),
        ("How do I split a string by commas in Go?", "How can I split a string on commas using Go?"),
        ("Why is the sky blue?", "What makes the sky blue?"),
        ("What time is it in Paris?", "What time it is in Paris?"),
        ("What does 'carpe diem' mean?", "meaning of carpe diem"),
        ("What's the difference between 'its' and 'it's'?", "its vs it's"),
        ("How do I install Node.js on Ubuntu?", "Installing Node.js on Ubuntu - what are the steps?"),
    ],
)
def test_later_rules_keep_paraphrases(a: str, b: str) -> None:
    _ok(a, b)
