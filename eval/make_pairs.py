"""Generate eval/semantic_pairs.jsonl: labelled prompt pairs for the semantic cache.

Every pair is written by hand below (a few are expanded from small hand-written templates).  label 1:
the cached answer to ``a`` may be served for ``b``; label 0: it must not.  Kinds:

paraphrase  same request, different words (label 1)
number      same request except a number (label 0)
unit        same request except a unit, or a unit bound to a different number (label 0)
quote       same request except quoted text / code (label 0)
negation    one of the two is negated (label 0)
direction   the same terms in the opposite direction / order (label 0)
entity      a different named entity (label 0)
language    a different programming or natural language (label 0)
keyword     a near-duplicate that differs in one key word (label 0)
multiturn   label 0: the last user message is identical or a paraphrase but the earlier turns differ;
            label 1: identical earlier turns and a paraphrased last message

Run: ``python eval/make_pairs.py`` (deterministic; rewrites the .jsonl next to this file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Message = dict[str, str]
Pair = dict[str, Any]

OUT = Path(__file__).with_name("semantic_pairs.jsonl")

# ------------------------------------------------------------------------------------ paraphrases (1)

PARAPHRASES: list[tuple[str, str]] = [
    # coding
    ("How do I reverse a list in Python?", "What's the way to reverse a Python list?"),
    ("How can I remove duplicates from a list in Python?", "What's the easiest way to dedupe a Python list?"),
    (
        "What is the difference between a list and a tuple in Python?",
        "How do Python lists differ from tuples?",
    ),
    (
        "How do I read a file line by line in Python?",
        "What's the best way to iterate over the lines of a file in Python?",
    ),
    ("Explain what a closure is in JavaScript.", "Can you explain closures in JavaScript?"),
    ("How do I undo the last git commit?", "How can I revert my most recent commit in git?"),
    ("What does the yield keyword do in Python?", "Explain what yield does in Python."),
    (
        "How do I check if a key exists in a Python dictionary?",
        "How can I test whether a dict in Python has a given key?",
    ),
    ("What is a race condition?", "Can you explain what a race condition is?"),
    ("How do I center a div with CSS?", "What's the way to center a div using CSS?"),
    ("What is dependency injection?", "Explain dependency injection to me."),
    (
        "How do I create a virtual environment in Python?",
        "What's the command to make a Python virtual environment?",
    ),
    ("Why should I use type hints in Python?", "What are the benefits of Python type hints?"),
    ("How do I merge two dictionaries in Python?", "What's the cleanest way to combine two dicts in Python?"),
    ("What is the time complexity of binary search?", "What's the big-O of binary search?"),
    (
        "How do I list all running Docker containers?",
        "What command shows the Docker containers that are running?",
    ),
    ("Explain the CAP theorem.", "Can you explain what the CAP theorem says?"),
    (
        "How do I make an HTTP request in JavaScript?",
        "What's the way to send an HTTP request from JavaScript?",
    ),
    ("What is the purpose of a Dockerfile?", "What is a Dockerfile used for?"),
    ("How do I handle exceptions in Java?", "What's the right way to deal with exceptions in Java?"),
    ("What is memoization?", "Can you explain memoization?"),
    ("How do I write a unit test in Go?", "How can I write unit tests in Go?"),
    ("What does REST stand for?", "What is REST short for?"),
    ("How do I rename a branch in git?", "What's the command to rename a git branch?"),
    ("Explain the difference between TCP and UDP.", "How does TCP differ from UDP?"),
    ("What is a foreign key in SQL?", "Can you explain foreign keys in SQL?"),
    ("How do I find the length of a string in JavaScript?", "How can I get a JavaScript string's length?"),
    ("What is the GIL in Python?", "Explain Python's GIL."),
    # travel
    ("What documents do I need to travel to Japan?", "Which documents are required for a trip to Japan?"),
    ("What is the best time of year to visit Iceland?", "When is the best season to visit Iceland?"),
    ("Can I bring a laptop in my carry-on bag?", "Am I allowed to take a laptop in my carry-on?"),
    (
        "How early should I arrive at the airport for an international flight?",
        "How long before an international flight should I get to the airport?",
    ),
    ("What are the must-see sights in Rome?", "Which sights in Rome should I not miss?"),
    ("Is tap water safe to drink in Mexico?", "Can you safely drink the tap water in Mexico?"),
    (
        "Do I need a visa to visit Canada as a UK citizen?",
        "As a UK citizen, is a visa required to visit Canada?",
    ),
    (
        "What should I pack for a week of hiking in Scotland?",
        "What do I need to pack for a hiking week in Scotland?",
    ),
    (
        "How do I get from the airport to the city centre in Lisbon?",
        "What's the best way to get from Lisbon airport to the city centre?",
    ),
    ("What currency is used in Switzerland?", "Which currency do they use in Switzerland?"),
    ("Any tips for dealing with jet lag?", "How can I cope with jet lag?"),
    ("What's the tipping etiquette in the United States?", "How much should I tip in the United States?"),
    ("Is it safe to travel alone in Vietnam?", "Is Vietnam safe for solo travellers?"),
    # cooking
    ("How do I make a sourdough starter?", "What's the process for making a sourdough starter?"),
    ("How long should I boil an egg for a runny yolk?", "How long do I boil an egg to get a runny yolk?"),
    ("What can I use as a substitute for buttermilk?", "What's a good buttermilk substitute?"),
    ("How do I keep guacamole from turning brown?", "How can I stop guacamole from going brown?"),
    (
        "What's the difference between baking soda and baking powder?",
        "How do baking soda and baking powder differ?",
    ),
    ("How do I make fluffy pancakes?", "What's the secret to fluffy pancakes?"),
    ("How should I store fresh basil?", "What's the best way to store fresh basil?"),
    ("Why did my bread not rise?", "Why didn't my bread rise?"),
    ("How do I cook rice on the stove?", "What's the method for cooking rice on a stovetop?"),
    ("Give me a simple recipe for tomato soup.", "Can you give me an easy tomato soup recipe?"),
    ("How do I caramelize onions?", "What's the way to caramelise onions?"),
    ("How can I tell if an avocado is ripe?", "How do I know when an avocado is ripe?"),
    ("What herbs go well with lamb?", "Which herbs pair well with lamb?"),
    # math
    ("What is 15% of 200?", "Calculate 15 percent of 200."),
    ("What is the square root of 144?", "Compute the square root of 144."),
    ("What is 7 times 8?", "What's seven times eight?"),
    ("Is 97 a prime number?", "Is 97 prime?"),
    ("What is the derivative of x squared?", "Differentiate x squared."),
    ("Explain the Pythagorean theorem.", "Can you explain the Pythagorean theorem?"),
    ("What is the area of a circle with radius 3?", "Find the area of a circle whose radius is 3."),
    ("How do I calculate the mean of a set of numbers?", "How is the mean of a set of numbers calculated?"),
    ("What is 1+1?", "What's one plus one?"),
    ("What is a prime number?", "Can you define a prime number?"),
    ("Solve 2x + 6 = 10.", "Solve for x: 2x + 6 = 10"),
    ("What is the sum of the angles in a triangle?", "What do the angles of a triangle add up to?"),
    ("What is 2 to the power of 10?", "What's 2 to the 10th power?"),
    ("Explain what a logarithm is.", "What is a logarithm?"),
    # support
    ("How do I reset my password?", "I forgot my password, how can I reset it?"),
    ("How can I cancel my subscription?", "What's the way to cancel my subscription?"),
    ("Where can I download my invoice?", "Where do I find my invoices to download?"),
    ("How do I change the email address on my account?", "How can I update my account's email address?"),
    ("Why was my card declined?", "What are the reasons my card could be declined?"),
    ("How do I enable two-factor authentication?", "How can I turn on two-factor authentication?"),
    ("How do I delete my account?", "What's the process for deleting my account?"),
    ("Can I get a refund for my order?", "Is it possible to get my order refunded?"),
    ("How do I contact customer support?", "How can I get in touch with customer support?"),
    (
        "My app keeps crashing on startup, what can I do?",
        "What should I do if the app crashes every time it starts?",
    ),
    ("How do I update the app?", "How can I update the app to the latest version?"),
    ("Where can I track my package?", "How do I track my parcel?"),
    # HR
    ("How many vacation days do employees get?", "What is the annual vacation allowance for employees?"),
    ("How do I request parental leave?", "What's the process for requesting parental leave?"),
    ("What should I include in a job description?", "What belongs in a job description?"),
    (
        "How do I write a good performance review?",
        "What makes a good performance review and how do I write one?",
    ),
    (
        "What questions should I ask in an exit interview?",
        "Which questions are good to ask during an exit interview?",
    ),
    ("How do I submit an expense report?", "What's the procedure for submitting expense reports?"),
    (
        "Can you draft a polite email declining a job offer?",
        "Please write a polite email to decline a job offer.",
    ),
    ("How should I prepare for a salary negotiation?", "How do I get ready to negotiate my salary?"),
    ("What is the onboarding process for new hires?", "How does onboarding work for new employees?"),
    (
        "How do I give constructive feedback to a colleague?",
        "What's a good way to give a coworker constructive feedback?",
    ),
    ("Write a job posting for a senior data engineer.", "Draft a job ad for a senior data engineer."),
    # finance
    ("What is compound interest?", "Can you explain compound interest?"),
    (
        "What's the difference between a Roth IRA and a traditional IRA?",
        "How does a Roth IRA differ from a traditional IRA?",
    ),
    ("How do I create a monthly budget?", "What's the best way to set up a monthly budget?"),
    ("What is an index fund?", "Can you explain what an index fund is?"),
    ("How does inflation affect savings?", "What impact does inflation have on savings?"),
    ("What is a credit score?", "Explain what a credit score is."),
    ("How can I improve my credit score?", "What can I do to raise my credit score?"),
    ("What is diversification in investing?", "Explain diversification in investing."),
    ("How much should I save for an emergency fund?", "How big should my emergency fund be?"),
    ("What is a bond?", "Can you explain what a bond is in finance?"),
    ("What does EBITDA mean?", "What is EBITDA?"),
    ("How are capital gains taxed?", "How does capital gains tax work?"),
    # science
    ("Why is the sky blue?", "What makes the sky blue?"),
    ("How does photosynthesis work?", "Explain how photosynthesis works."),
    ("What is the speed of light?", "How fast does light travel?"),
    ("What causes the seasons on Earth?", "Why does Earth have seasons?"),
    ("What is DNA made of?", "What are the components of DNA?"),
    ("How do vaccines work?", "Can you explain how vaccines work?"),
    ("What is a black hole?", "Explain what a black hole is."),
    ("Why do we have tides?", "What causes the tides?"),
    ("What is the theory of evolution?", "Explain the theory of evolution."),
    ("How does a refrigerator keep food cold?", "How does a fridge keep things cold?"),
    ("What is quantum entanglement?", "Can you explain quantum entanglement?"),
    ("Why do leaves change colour in autumn?", "What makes leaves change color in the fall?"),
    ("How do airplanes stay in the air?", "What keeps an airplane in the air?"),
    ("What is the boiling point of water at sea level?", "At what temperature does water boil at sea level?"),
    # general / writing
    ("Summarise the plot of Hamlet.", "Give me a summary of Hamlet's plot."),
    ("Who painted the Mona Lisa?", "Who was the painter of the Mona Lisa?"),
    ("What is the capital of Australia?", "What's Australia's capital city?"),
    ("Write a haiku about autumn.", "Compose a haiku about autumn."),
    ("Give me tips for better sleep.", "What are some tips to sleep better?"),
    ("How do I get better at public speaking?", "What can I do to improve at public speaking?"),
    ("What are the health benefits of green tea?", "What health benefits does green tea have?"),
    ("Suggest a name for a coffee shop.", "Can you suggest a coffee shop name?"),
    ("How do I stay focused while working from home?", "How can I stay focused when I work from home?"),
    ("What is the meaning of 'carpe diem'?", 'What does "carpe diem" mean?'),
    ("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?"),
    ("How many continents are there?", "How many continents does the world have?"),
    ("Convert 5 km to miles.", "How many miles is 5 km?"),
    ("What is 100 USD in EUR?", "Convert $100 to euros."),
    ("How many grams are in 2 pounds?", "How many grams is 2 lb?"),
    ("What's 30°C in Fahrenheit?", "What is 30 degrees Celsius in Fahrenheit?"),
    ("Translate 'good morning' to French.", "How do you say 'good morning' in French?"),
    ("Why isn't my Python script running?", "Why is my Python script not running?"),
    (
        "What are some vegetarian dishes without cheese?",
        "Suggest some vegetarian dishes that don't contain cheese.",
    ),
]

# Written after the guards, in styles they were not tuned on (informal, typos, reordering); kept even where
# the guards veto them, so recall is not flattered.
PARAPHRASES += [
    ("whats the fastest way to learn touch typing", "How can I learn touch typing quickly?"),
    ("python list comprehension explained pls", "Can you explain list comprehensions in Python?"),
    ("how 2 make cold brew coffee", "How do I make cold brew coffee?"),
    ("Tips for a first-time marathon runner?", "Any advice for someone running their first marathon?"),
    ("I keep getting a 502 from nginx, why?", "Why does nginx keep returning 502 errors?"),
    ("explain like I'm five: how does the internet work", "ELI5 how the internet works"),
    ("What's the difference between affect and effect?", "Affect vs effect: what's the difference?"),
    ("can u recommend a good sci-fi book", "Recommend me a good science fiction book."),
    ("How do I politely ask my manager for a raise?", "What's a polite way to ask my boss for a raise?"),
    ("Is it worth paying off my mortgage early?", "Should I pay my mortgage off early?"),
    ("How do I get rid of fruit flies in my kitchen?", "How can I eliminate fruit flies from the kitchen?"),
    (
        "What's a healthy breakfast I can make in 5 minutes?",
        "Healthy breakfast ideas that take 5 minutes to make?",
    ),
    ("How does a hash map work under the hood?", "Explain the internals of a hash map."),
    ("What's the best way to learn SQL as a beginner?", "As a beginner, how should I learn SQL?"),
    ("how do i stop procrastinating", "What can I do to stop procrastinating?"),
    ("Why is my sourdough so dense?", "What makes sourdough bread come out dense?"),
    ("Explain the difference between stocks and bonds", "Stocks vs bonds: how are they different?"),
    ("How does HTTPS keep my data safe?", "How does HTTPS protect my data?"),
    ("What is the Krebs cycle?", "Explain the Krebs cycle."),
    (
        "What are good interview questions for a product manager?",
        "Which questions should I ask when interviewing a product manager?",
    ),
    ("How can I reduce my electricity bill?", "Ways to lower my electricity bill?"),
    ("How long does it take to get to Mars?", "How long would a trip to Mars take?"),
    ("How do I convert a PDF to Word?", "What's the way to turn a PDF into a Word document?"),
    ("Who discovered penicillin?", "Penicillin was discovered by whom?"),
    (
        "What's the weather usually like in Lisbon in October?",
        "How is the weather in Lisbon in October, typically?",
    ),
    ("Best way to clean a cast iron pan?", "How should I clean a cast-iron skillet?"),
    ("How to centre text in Word", "How do I center text in Microsoft Word?"),
    ("What is Kubernetes used for?", "What's the purpose of Kubernetes?"),
    ("How do I find my IP address on a Mac?", "How can I check my Mac's IP address?"),
    ("What's the difference between weather and climate?", "How is weather different from climate?"),
    (
        "How do I say no to extra work without feeling guilty?",
        "How can I decline additional work without guilt?",
    ),
    (
        "Recommend a laptop for programming under 1000 dollars",
        "What's a good programming laptop for less than $1000?",
    ),
    ("What does a product owner do?", "What are the responsibilities of a product owner?"),
    ("How do I write a resignation letter?", "How should I write a letter of resignation?"),
    ("Can dogs eat grapes?", "Are grapes safe for dogs to eat?"),
    ("what time zone is new york in", "Which time zone is New York in?"),
    ("How do you calculate ROI?", "What's the formula for ROI?"),
    ("Why do cats purr?", "What makes cats purr?"),
    ("Give me an example of a SQL JOIN.", "Show me an example of a JOIN in SQL."),
    ("How much protein do I need per day?", "What's my daily protein requirement?"),
]

# Templated coding paraphrases: (task phrase A, task phrase B) x language.
TASKS: list[tuple[str, str]] = [
    ("sort a list of numbers", "sort a list of numbers"),
    ("read a JSON file", "load a JSON file"),
    ("split a string by commas", "split a string on commas"),
    ("get the current date", "get today's date"),
    ("remove whitespace from a string", "strip whitespace from a string"),
    ("generate a random number", "produce a random number"),
]
TEMPLATES_A = ["How do I {t} in {l}?", "In {l}, how can I {t}?", "What's the {l} way to {t}?"]
TEMPLATES_B = ["What's the best way to {t} in {l}?", "How can I {t} using {l}?", "Show me how to {t} in {l}."]
LANGS = ["Python", "JavaScript", "Java", "Rust", "Go", "C#"]

# -------------------------------------------------------------------------------- hard negatives (0)

NEGATIVES: dict[str, list[tuple[str, str]]] = {
    "number": [
        ("What is 15% of 200?", "What is 15% of 300?"),
        ("Is 91 a prime number?", "Is 97 a prime number?"),
        ("What is 7 times 8?", "What is 7 times 9?"),
        ("What is 2 to the power of 10?", "What is 2 to the power of 12?"),
        ("Give me five tips for better sleep.", "Give me ten tips for better sleep."),
        ("What is the square root of 144?", "What is the square root of 169?"),
        ("What is the area of a circle with radius 3?", "What is the area of a circle with radius 4?"),
        ("Solve 2x + 6 = 10.", "Solve 2x + 6 = 12."),
        ("What happened in 1969?", "What happened in 1968?"),
        ("Summarise chapter 3 of the book.", "Summarise chapter 4 of the book."),
        ("What is -5 squared?", "What is 5 squared?"),
        ("What's 0.1 + 0.2?", "What's 0.1 + 0.3?"),
        ("Write a poem with 4 stanzas about the sea.", "Write a poem with 6 stanzas about the sea."),
        ("What is 12 divided by 4?", "What is 4 divided by 12?"),
        ("What is 3 + 5?", "What is 3 * 5?"),
        ("What's the third largest planet?", "What's the fourth largest planet?"),
        ("How do I upgrade from Python 3.8?", "How do I upgrade from Python 3.11?"),
        ("What does HTTP status 404 mean?", "What does HTTP status 403 mean?"),
        ("What is the 10th Fibonacci number?", "What is the 12th Fibonacci number?"),
        ("Plan a 3-day itinerary for Rome.", "Plan a 5-day itinerary for Rome."),
        (
            "How many calories do I burn running for 30 minutes?",
            "How many calories do I burn running for 60 minutes?",
        ),
        (
            "Roll a die twice; what is the probability of two sixes?",
            "Roll a die three times; what is the probability of three sixes?",
        ),
        (
            "A loan of 10,000 at 5% for 3 years: what's the interest?",
            "A loan of 10,000 at 6% for 3 years: what's the interest?",
        ),
        ("Is a salary of 50k enough to live in Berlin?", "Is a salary of 80k enough to live in Berlin?"),
        ("Give me a recipe that serves 2.", "Give me a recipe that serves 8."),
    ],
    "unit": [
        ("Convert 5 km to miles.", "Convert 5 miles to km."),
        ("How long does it take to walk 10 km?", "How long does it take to walk 10 miles?"),
        ("Convert 100 USD to EUR.", "Convert 100 EUR to USD."),
        ("Is 30°C hot?", "Is 30°F hot?"),
        ("How many calories are in 100 g of rice?", "How many calories are in 100 kg of rice?"),
        ("Bake the chicken for 40 minutes.", "Bake the chicken for 40 hours."),
        ("What is 20 dollars in yen?", "What is 20 euros in yen?"),
        ("How many cups is 500 ml?", "How many cups is 500 l?"),
        ("Is 2 GB of RAM enough for a web server?", "Is 2 TB of RAM enough for a web server?"),
        ("How heavy is 5 kg in pounds?", "How heavy is 5 lb in kilograms?"),
        ("Is a 5% raise good?", "Is a 5 dollar raise good?"),
        ("Can I drive 100 mph on the highway?", "Can I drive 100 km/h on the highway?"),
        ("How much is 3 tbsp of butter in grams?", "How much is 3 tsp of butter in grams?"),
        ("Set an alarm for 7 am.", "Set an alarm for 7 pm."),
        ("Is 1 acre bigger than a football pitch?", "Is 1 hectare bigger than a football pitch?"),
        ("How much is £50 in dollars?", "How much is $50 in pounds?"),
        ("Run 5 km in 25 minutes: what's my pace?", "Run 5 miles in 25 minutes: what's my pace?"),
        ("Cook the pasta for 10 minutes.", "Cook the pasta for 10 seconds."),
        ("Is 500 kcal a lot for lunch?", "Is 500 kJ a lot for lunch?"),
        (
            "A 3 kW heater running for 2 hours uses how much energy?",
            "A 3 W heater running for 2 hours uses how much energy?",
        ),
    ],
    "quote": [
        ("Translate 'good morning' to French.", "Translate 'good night' to French."),
        ('What does "carpe diem" mean?', 'What does "carpe noctem" mean?'),
        ("What does `git stash pop` do?", "What does `git stash drop` do?"),
        ("What does `ls -la` do?", "What does `ls -lh` do?"),
        ('Is "their" correct in "their going home"?', 'Is "there" correct in "there going home"?'),
        (
            "Fix this error: `TypeError: 'NoneType' object is not iterable`",
            "Fix this error: `TypeError: 'int' object is not iterable`",
        ),
        ('Write a tweet announcing "Spring Sale"', 'Write a tweet announcing "Summer Sale"'),
        ("Explain the regex `^\\d{3}$`.", "Explain the regex `^\\d{3,}$`."),
        ('Proofread: "I has a apple."', 'Proofread: "I has an orange."'),
        ("What does `SELECT * FROM users` return?", "What does `SELECT id FROM users` return?"),
        ("Rhyme with 'cat'.", "Rhyme with 'hat'."),
        ('Is "irregardless" a real word?', 'Is "irrespective" a real word?'),
        (
            "What is wrong with `for i in range(10) print(i)`?",
            "What is wrong with `for i in range(10): print(i)`?",
        ),
        ("Translate 'I love you' into Italian.", "Translate 'I miss you' into Italian."),
        (
            'Summarise this review: "Great food, slow service."',
            'Summarise this review: "Slow food, great service."',
        ),
        ("What does 'break a leg' mean?", "What does 'break the ice' mean?"),
        ("Count the vowels in 'banana'.", "Count the vowels in 'bandana'."),
        (
            "Reply to the customer who wrote 'my order never arrived'",
            "Reply to the customer who wrote 'my order arrived damaged'",
        ),
        ("What's the output of `print(2 ** 3)`?", "What's the output of `print(2 * 3)`?"),
        ("Name a synonym for 'happy'.", "Name a synonym for 'sad'."),
    ],
    "negation": [
        ("Is Paris the capital of France?", "Is Paris not the capital of France?"),
        ("Which foods are safe for dogs?", "Which foods are not safe for dogs?"),
        ("Can I take ibuprofen with food?", "Can I take ibuprofen without food?"),
        ("List fruits that are high in sugar.", "List fruits that are not high in sugar."),
        ("Why does my script run?", "Why doesn't my script run?"),
        ("Give me a vegan cake recipe with nuts.", "Give me a vegan cake recipe without nuts."),
        (
            "Which countries require a visa for US citizens?",
            "Which countries don't require a visa for US citizens?",
        ),
        ("What should I do before an interview?", "What should I never do before an interview?"),
        ("Is it legal to record a phone call?", "Is it illegal to record a phone call? Why not?"),
        ("Which expenses are tax deductible?", "Which expenses are not tax deductible?"),
        ("Should I use a VPN on public Wi-Fi?", "Should I not use a VPN on public Wi-Fi?"),
        ("Which metals are magnetic?", "Which metals are not magnetic?"),
        ("List all employees in the sales team.", "List all employees except the sales team."),
        ("Can I freeze cooked rice?", "Can't I freeze cooked rice?"),
        (
            "What happens if I pay my credit card on time?",
            "What happens if I don't pay my credit card on time?",
        ),
        ("Are mushrooms vegetables?", "Are mushrooms not vegetables?"),
        ("Which animals can swim?", "Which animals cannot swim?"),
        ("How do I run tests with coverage?", "How do I run tests without coverage?"),
        ("Is the refund processed automatically?", "Is the refund never processed automatically?"),
        ("Suggest a dinner with meat.", "Suggest a dinner with no meat."),
    ],
    "direction": [
        (
            "Translate this from English to Spanish: good evening",
            "Translate this from Spanish to English: good evening",
        ),
        ("Flights from London to New York in May", "Flights from New York to London in May"),
        ("How do I convert a string to an int in Java?", "How do I convert an int to a string in Java?"),
        ("Is Python faster than Java?", "Is Java faster than Python?"),
        ("Port this code from Rust to Go.", "Port this code from Go to Rust."),
        ("Convert celsius to fahrenheit.", "Convert fahrenheit to celsius."),
        ("Replace tabs with spaces in my editor.", "Replace spaces with tabs in my editor."),
        ("Convert a list to a dictionary.", "Convert a dictionary into a list."),
        (
            "How far is it from Madrid to Barcelona by train, and is it faster than flying?",
            "How far is it from Barcelona to Madrid by train, and is it faster than flying?",
        ),
        ("Migrate our database from MySQL to Postgres.", "Migrate our database from Postgres to MySQL."),
        ("Convert JSON to YAML.", "Convert YAML to JSON."),
        ("Is a cat bigger than a fox?", "Is a fox bigger than a cat?"),
        ("Transfer money from savings to checking.", "Transfer money from checking to savings."),
        ("Convert hex to decimal.", "Convert decimal to hex."),
        ("How do I move from Windows to Linux?", "How do I move from Linux to Windows?"),
        ("Map the Markdown to HTML.", "Map the HTML to Markdown."),
        ("Should I switch from iPhone to Android?", "Should I switch from Android to iPhone?"),
        ("Is Everest taller than K2?", "Is K2 taller than Everest?"),
        ("Drive from Boston to Chicago: how long?", "Drive from Chicago to Boston: how long?"),
        ("Convert a PDF into Word.", "Convert Word into a PDF."),
    ],
    "entity": [
        ("What is the population of Canada?", "What is the population of Mexico?"),
        ("Who wrote Hamlet?", "Who wrote Macbeth?"),
        ("What is the capital of Australia?", "What is the capital of Austria?"),
        ("How do I create a bucket on AWS?", "How do I create a bucket on GCP?"),
        ("When was Google founded?", "When was Amazon founded?"),
        ("What's the weather like in Tokyo in April?", "What's the weather like in Osaka in April?"),
        ("Who is the CEO of Microsoft?", "Who is the CEO of Apple?"),
        (
            "Tell me about the history of the Roman Empire.",
            "Tell me about the history of the Ottoman Empire.",
        ),
        ("What are the best beaches in Portugal?", "What are the best beaches in Greece?"),
        ("How do I set up a React project?", "How do I set up a Vue project?"),
        ("Summarise the main ideas of Kant.", "Summarise the main ideas of Hegel."),
        ("What does NASA do?", "What does NOAA do?"),
        ("How tall is the Eiffel Tower?", "How tall is the Empire State Building?"),
        ("What is Tesla's market cap?", "What is Ford's market cap?"),
        ("Explain the plot of Inception.", "Explain the plot of Interstellar."),
        ("Is Netflix available in India?", "Is Hulu available in India?"),
        ("How do I reach Heathrow from central London?", "How do I reach Gatwick from central London?"),
        ("What did Einstein discover?", "What did Newton discover?"),
        ("How do I file taxes with the IRS?", "How do I file taxes with HMRC?"),
        ("Compare the iPhone camera to the Pixel camera.", "Compare the iPhone camera to the Galaxy camera."),
        ("What is the GDP of Germany?", "What is the GDP of Japan?"),
        ("Recommend a hotel near Central Park.", "Recommend a hotel near Hyde Park."),
        ("Who won the World Cup in Brazil?", "Who won the World Cup in Russia?"),
        ("What language is spoken in Brazil?", "What language is spoken in Argentina?"),
    ],
    "language": [
        ("Sort a list in Python.", "Sort a list in Java."),
        ("How do I read a file in Go?", "How do I read a file in Rust?"),
        ("Explain pointers in C.", "Explain pointers in C++."),
        ("How do I parse JSON in JavaScript?", "How do I parse JSON in TypeScript?"),
        ("Write hello world in C#.", "Write hello world in Java."),
        ("How do I loop over files in bash?", "How do I loop over files in PowerShell?"),
        ("Say 'thank you' in French.", "Say 'thank you' in German."),
        ("How do I define a class in Ruby?", "How do I define a class in PHP?"),
        ("Write a function to reverse a string in Kotlin.", "Write a function to reverse a string in Swift."),
        ("How do I connect to a database in Python?", "How do I connect to a database in Node.js?"),
        ("How are errors handled in Go?", "How are errors handled in Rust?"),
        (
            "Translate 'where is the station' into Spanish.",
            "Translate 'where is the station' into Portuguese.",
        ),
        ("How do I write a for loop in Scala?", "How do I write a for loop in Haskell?"),
        (
            "What's the Python equivalent of a switch statement?",
            "What's the Ruby equivalent of a switch statement?",
        ),
        (
            "How do I make a GET request with Python requests?",
            "How do I make a GET request with JavaScript fetch?",
        ),
        ("Write a SQL query to count rows per day.", "Write a pandas snippet to count rows per day."),
        ("What are generics in Java?", "What are generics in TypeScript?"),
        ("How do I handle dates in PHP?", "How do I handle dates in Perl?"),
        ("Reply to this email in English.", "Reply to this email in Japanese."),
        ("How do I install packages for Python?", "How do I install packages for R?"),
    ],
    "keyword": [
        ("What is the capital of Australia?", "What is the population of Australia?"),
        ("How do I encrypt a file with GPG?", "How do I decrypt a file with GPG?"),
        ("Sort the array in ascending order.", "Sort the array in descending order."),
        ("What is the maximum value in a Python list?", "What is the minimum value in a Python list?"),
        ("Should I stretch before running?", "Should I stretch after running?"),
        ("How do I upload a file to S3?", "How do I download a file from S3?"),
        ("What are the advantages of remote work?", "What are the disadvantages of remote work?"),
        ("How do I enable dark mode?", "How do I disable dark mode?"),
        ("How do I increase my credit limit?", "How do I decrease my credit limit?"),
        ("When is the best time to buy a house?", "When is the best time to sell a house?"),
        ("How do I add a user to a group in Linux?", "How do I remove a user from a group in Linux?"),
        ("How do I export my contacts?", "How do I import my contacts?"),
        ("What is the boiling point of ethanol?", "What is the freezing point of ethanol?"),
        ("What is the mean of this data set: 3, 5, 9?", "What is the median of this data set: 3, 5, 9?"),
        ("How do I hire a contractor?", "How do I fire a contractor?"),
        ("Give me a synonym for 'quick'.", "Give me an antonym for 'quick'."),
        ("Write a cover letter for a teaching job.", "Write a resignation letter for a teaching job."),
        ("How do I bake salmon?", "How do I grill salmon?"),
        ("What are the symptoms of the flu?", "What are the causes of the flu?"),
        ("How do I calculate gross margin?", "How do I calculate net margin?"),
        ("What's the best way to learn guitar?", "What's the worst way to learn guitar?"),
        ("How do I merge two git branches?", "How do I delete two git branches?"),
        (
            "What is the first step in onboarding a new hire?",
            "What is the last step in onboarding a new hire?",
        ),
        ("How do I push changes to GitHub?", "How do I pull changes from GitHub?"),
    ],
}

# Written after the guards, aimed at their blind spots (lowercase entities, tools and antonyms they do not
# list); kept whatever the guards make of them.
for _kind, _a, _b in [
    ("entity", "what is the capital of france", "what is the capital of germany"),
    ("entity", "best pizza in new york", "best pizza in chicago"),
    ("entity", "What is the tallest mountain in Africa?", "What is the tallest mountain in Europe?"),
    ("entity", "How do I go from Dublin to Galway by bus?", "How do I go from Dublin to Cork by bus?"),
    ("number", "Explain quantum computing like I'm five.", "Explain quantum computing like I'm fifteen."),
    ("number", "What's the 2nd law of thermodynamics?", "What's the first law of thermodynamics?"),
    ("number", "Symptoms of vitamin D deficiency?", "Symptoms of vitamin B12 deficiency?"),
    ("direction", "How do I go from Dublin to Galway?", "How do I go from Galway to Dublin?"),
    ("negation", "Things to do in Paris that are free", "Things to do in Paris that aren't free"),
    ("unit", "How many ounces in a cup?", "How many grams in a cup?"),
    ("language", "how do i install packages with pip", "how do i install packages with npm"),
    ("keyword", "How do I boil potatoes?", "How do I mash potatoes?"),
    ("keyword", "Is coffee bad for you?", "Is coffee good for you?"),
    ("keyword", "Write a formal email to my landlord.", "Write an angry email to my landlord."),
    ("keyword", "How do I make my code run faster?", "How do I make my code run slower?"),
    ("keyword", "How do I become a data scientist?", "How do I become a data engineer?"),
    (
        "keyword",
        "Give me a recipe for chocolate chip cookies.",
        "Give me a recipe for oatmeal raisin cookies.",
    ),
    ("keyword", "What is a good credit score in the US?", "What is a bad credit score in the US?"),
    ("keyword", "What are the side effects of ibuprofen?", "What are the side effects of paracetamol?"),
    (
        "keyword",
        "How do I write a cover letter for an internship?",
        "How do I write a thank-you letter for an internship?",
    ),
]:
    NEGATIVES[_kind].append((_a, _b))

# ---------------------------------------------------------------------------------------- multi-turn

SYSTEMS = [
    ("You are a helpful assistant.", "You are a helpful assistant. Always answer in French."),
    ("You are a senior Python developer.", "You are a senior Java developer."),
    ("You are a travel agent for budget travellers.", "You are a travel agent for luxury travellers."),
    ("Answer in one sentence.", "Answer in detail with examples."),
    (
        "You are a pediatric nurse; answers are about children.",
        "You are a veterinary nurse; answers are about dogs.",
    ),
    ("You are a support bot for Acme Bank.", "You are a support bot for Globex Telecom."),
    (
        "You are an HR assistant for a company in Germany.",
        "You are an HR assistant for a company in the United States.",
    ),
    ("Reply only with valid JSON.", "Reply only with plain text."),
    ("You are a tutor for 8-year-olds.", "You are a tutor for university students."),
    ("You are a chef specialising in vegan food.", "You are a chef specialising in barbecue."),
    ("You are a tax adviser in the UK.", "You are a tax adviser in Australia."),
    ("Use metric units.", "Use imperial units."),
    ("You are a pirate. Talk like one.", "You are a formal butler. Talk like one."),
    ("The user is a beginner.", "The user is an expert."),
]
SYSTEM_QUESTIONS = [
    ("What's a good dinner for tonight?", "What should I make for dinner tonight?"),
    ("How do I sort a list?", "How can I sort a list?"),
    ("Where should I stay in Paris?", "Where should I stay in Paris?"),
    ("Explain what a derivative is.", "What is a derivative?"),
    ("How much water should they drink per day?", "How much water should they drink daily?"),
    ("How do I reset my PIN?", "How can I reset my PIN?"),
    ("How many vacation days are typical?", "How many vacation days are standard?"),
    ("List three primary colours.", "Name three primary colours."),
    ("What is photosynthesis?", "Explain photosynthesis."),
    ("Suggest a dessert.", "Suggest a dessert."),
    ("Do I need to pay tax on my savings interest?", "Do I have to pay tax on interest from my savings?"),
    ("How tall is the average adult man?", "What's the average height of an adult man?"),
    ("Tell me about the weather.", "Tell me about the weather."),
    ("How do I write a for loop?", "How do I write a for loop?"),
]

# (shared first user turn, assistant reply A, assistant reply B) -- same question, different replies.
HISTORIES_ASSISTANT: list[tuple[str, str, str, str, str]] = [
    (
        "Recommend a language for a CLI tool.",
        "I'd suggest Go.",
        "I'd suggest Python.",
        "How do I parse command-line flags in it?",
        "How can I parse command line flags in it?",
    ),
    (
        "Pick a city for my weekend trip.",
        "Try Lisbon.",
        "Try Prague.",
        "What should I see there?",
        "What is worth seeing there?",
    ),
    ("Pick a number between 1 and 10.", "7.", "3.", "Is it prime?", "Is it a prime number?"),
    (
        "Which database should we use?",
        "PostgreSQL.",
        "MongoDB.",
        "How do I back it up?",
        "How can I back it up?",
    ),
    (
        "Suggest a main dish.",
        "Roast chicken.",
        "Mushroom risotto.",
        "What wine goes with it?",
        "Which wine pairs with it?",
    ),
    (
        "What's a good first investment?",
        "An index fund.",
        "Government bonds.",
        "What are the risks?",
        "What risks are there?",
    ),
    (
        "Name a famous physicist.",
        "Marie Curie.",
        "Richard Feynman.",
        "What is she or he known for?",
        "What are they known for?",
    ),
    (
        "Suggest a framework for my web app.",
        "Django.",
        "Ruby on Rails.",
        "How do I deploy it?",
        "How can I deploy it?",
    ),
]

# (first user turn A, first user turn B, follow-up A, follow-up B) -- different earlier user turns.
HISTORIES_USER: list[tuple[str, str, str, str]] = [
    ("I'm writing Python.", "I'm writing Java.", "How do I read a file?", "How can I read a file?"),
    (
        "I'm flying to Tokyo next week.",
        "I'm flying to Sydney next week.",
        "What should I pack?",
        "What do I need to pack?",
    ),
    ("I have chicken and rice.", "I have tofu and noodles.", "What can I cook?", "What could I cook?"),
    (
        "My salary is 40,000 a year.",
        "My salary is 120,000 a year.",
        "How much should I save each month?",
        "How much should I save monthly?",
    ),
    (
        "I work in Germany.",
        "I work in Japan.",
        "How much parental leave do I get?",
        "How much parental leave am I entitled to?",
    ),
    (
        "Here is my function: def f(x): return x * 2",
        "Here is my function: def f(x): return x ** 2",
        "What does it return for 3?",
        "What does it return for 3?",
    ),
    ("Consider the equation x + 3 = 7.", "Consider the equation x - 3 = 7.", "Solve it.", "Solve it."),
    (
        "I use an iPhone.",
        "I use an Android phone.",
        "How do I take a screenshot?",
        "How can I take a screenshot?",
    ),
    ("My order number is 1042.", "My order number is 2077.", "Where is my order?", "Where's my order?"),
    (
        "I'm a vegetarian.",
        "I eat everything.",
        "Suggest a high-protein lunch.",
        "Suggest a lunch high in protein.",
    ),
    (
        "Let's talk about Mars.",
        "Let's talk about Venus.",
        "How hot is it there?",
        "How hot does it get there?",
    ),
    (
        "The text is: 'The meeting is moved to Friday.'",
        "The text is: 'The meeting is cancelled.'",
        "Translate it to Spanish.",
        "Translate it into Spanish.",
    ),
    (
        "I'm a beginner at running.",
        "I've run ten marathons.",
        "Make me a training plan for this month.",
        "Create a training plan for me for this month.",
    ),
    (
        "We're a team of 5 people.",
        "We're a company of 500 people.",
        "Which project management tool should we use?",
        "What project management tool should we use?",
    ),
    ("My code: print(len('hello'))", "My code: print(len('hi'))", "What does it print?", "What's printed?"),
    (
        "I'm in London.",
        "I'm in Toronto.",
        "What's the emergency phone number?",
        "What number do I call in an emergency?",
    ),
]


def sys_(text: str) -> Message:
    return {"role": "system", "content": text}


def usr(text: str) -> Message:
    return {"role": "user", "content": text}


def ast(text: str) -> Message:
    return {"role": "assistant", "content": text}


# Label 1: identical history, paraphrased last message.
SAME_HISTORY: list[tuple[list[Message], str, str]] = [
    ([sys_("You are a helpful assistant.")], "How do I boil an egg?", "What's the way to boil an egg?"),
    (
        [sys_("You are a senior Python developer.")],
        "How do I reverse a list?",
        "What's the best way to reverse a list?",
    ),
    (
        [usr("I'm flying to Tokyo next week."), ast("Great, how can I help?")],
        "What should I pack?",
        "What do I need to pack?",
    ),
    (
        [usr("I have chicken and rice."), ast("Nice, those go well together.")],
        "What can I cook with them?",
        "What could I make with them?",
    ),
    ([sys_("You are a support bot for Acme Bank.")], "How do I reset my PIN?", "How can I reset my PIN?"),
    (
        [sys_("You are an HR assistant."), usr("I work in Germany."), ast("Understood.")],
        "How much parental leave do I get?",
        "How much parental leave am I entitled to?",
    ),
    ([usr("Consider the equation x + 3 = 7."), ast("OK.")], "Solve it.", "Can you solve it?"),
    (
        [sys_("You are a tutor for university students.")],
        "Explain what a derivative is.",
        "What is a derivative?",
    ),
    (
        [usr("Let's talk about Mars."), ast("Sure, Mars is the fourth planet.")],
        "How cold does it get there?",
        "How cold is it there?",
    ),
    (
        [sys_("You are a travel agent."), usr("I'm visiting Rome."), ast("Lovely city!")],
        "What are the must-see sights?",
        "Which sights should I not miss?",
    ),
    ([sys_("Answer in one sentence.")], "Why is the sky blue?", "What makes the sky blue?"),
    (
        [sys_("You are a tax adviser in the UK.")],
        "Do I need to pay tax on my savings interest?",
        "Do I have to pay tax on interest from my savings?",
    ),
    (
        [usr("My code: print(len('hello'))"), ast("It's a call to len.")],
        "What does it print?",
        "What does it output?",
    ),
    (
        [sys_("You are a chef specialising in vegan food.")],
        "Suggest a quick dinner.",
        "Can you suggest a quick dinner?",
    ),
    (
        [usr("I use an iPhone."), ast("Got it.")],
        "How do I take a screenshot?",
        "How can I take a screenshot?",
    ),
    (
        [sys_("You are a helpful assistant."), usr("I want to get fit."), ast("Happy to help.")],
        "Where should I start?",
        "Where do I begin?",
    ),
]


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def build() -> list[Pair]:
    pairs: list[Pair] = []

    def add(kind: str, a: list[Message], b: list[Message], label: int) -> None:
        pairs.append({"id": f"{kind}-{sum(p['kind'] == kind for p in pairs) + 1:03d}", "kind": kind,
                      "a": a, "b": b, "label": label})  # fmt: skip

    for a, b in PARAPHRASES:
        add("paraphrase", user(a), user(b), 1)
    for i, (ta, tb) in enumerate(TASKS):
        for j, lang in enumerate(LANGS):
            if (i + j) % 2:  # half the grid keeps the set varied without flooding it
                continue
            add("paraphrase", user(TEMPLATES_A[(i + j) % 3].format(t=ta, l=lang)),
                user(TEMPLATES_B[(i + 2 * j) % 3].format(t=tb, l=lang)), 1)  # fmt: skip
    for kind, items in NEGATIVES.items():
        for a, b in items:
            add(kind, user(a), user(b), 0)
    # Templated language negatives: same task, different language.
    for i, (ta, tb) in enumerate(TASKS):
        la, lb = LANGS[i % len(LANGS)], LANGS[(i + 1) % len(LANGS)]
        add(
            "language",
            user(TEMPLATES_A[i % 3].format(t=ta, l=la)),
            user(TEMPLATES_B[i % 3].format(t=tb, l=lb)),
            0,
        )

    # Multi-turn, label 0: different system prompts.
    for (sa, sb), (qa, qb) in zip(SYSTEMS, SYSTEM_QUESTIONS, strict=True):
        add(
            "multiturn",
            [{"role": "system", "content": sa}, *user(qa)],
            [{"role": "system", "content": sb}, *user(qb)],
            0,
        )
    # A system prompt on one side only.
    for sa, _ in SYSTEMS[:4]:
        q = "Give me three tips for writing clean code."
        add("multiturn", [{"role": "system", "content": sa}, *user(q)], user(q), 0)
    # Different assistant turns.
    for first, ra, rb, qa, qb in HISTORIES_ASSISTANT:
        conv_a = [*user(first), {"role": "assistant", "content": ra}, *user(qa)]
        conv_b = [*user(first), {"role": "assistant", "content": rb}, *user(qb)]
        add("multiturn", conv_a, conv_b, 0)
    # Different earlier user turns.
    for fa, fb, qa, qb in HISTORIES_USER:
        conv_a = [*user(fa), {"role": "assistant", "content": "Okay."}, *user(qa)]
        conv_b = [*user(fb), {"role": "assistant", "content": "Okay."}, *user(qb)]
        add("multiturn", conv_a, conv_b, 0)
    # Extra turn on one side.
    for fa, _, qa, _ in HISTORIES_USER[:4]:
        add("multiturn", [*user(fa), {"role": "assistant", "content": "Okay."}, *user(qa)], user(qa), 0)
    # Multi-turn, label 1: identical history, paraphrased last message.
    for history, qa, qb in SAME_HISTORY:
        add("multiturn", [*history, *user(qa)], [*history, *user(qb)], 1)
    return pairs


def main() -> None:
    pairs = build()
    ids = [p["id"] for p in pairs]
    assert len(ids) == len(set(ids))
    with OUT.open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    pos = sum(p["label"] for p in pairs)
    mt0 = sum(1 for p in pairs if p["kind"] == "multiturn" and p["label"] == 0)
    neg = len(pairs) - pos
    print(f"wrote {len(pairs)} pairs to {OUT} ({pos} label 1, {neg} label 0, {mt0} multi-turn label 0)")


if __name__ == "__main__":
    main()
