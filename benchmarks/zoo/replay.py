"""General prompts no adapter of the zoo is for, answered by the base model itself (replay).

Each adapter is trained on its task *and* on these prompts with the base model's own greedy
answers as targets (self-distillation, "rehearsal"), so that on a prompt outside its task an
adapter answers as the base model would: a misrouted or partly-weighted adapter then costs little.
These prompts are written for training only; the out-of-library prompts of the natural-phrasing
benchmark (``benchmarks/data/natural_prompts.json``) are different questions.
"""

from __future__ import annotations

# fmt: off
REPLAY_PROMPTS: tuple[str, ...] = (
    # general knowledge
    "Who invented the telephone?", "What is the tallest mountain in the world?",
    "Why is the sky blue?", "What do bees make?", "How many continents are there?",
    "What is the smallest prime number?", "Who discovered penicillin?",
    "What is the hardest natural substance?", "Which planet is known as the red planet?",
    "What is the longest river in Africa?", "How many players are on a soccer team?",
    "What does DNA stand for?", "Who wrote the novel 1984?", "What is the speed of light?",
    "What do pandas eat?", "Where do penguins live?",
    "What is the currency of Japan?", "Which animal is the fastest on land?",
    "What causes rain?", "How many bones are in the human body?",
    "What instrument has 88 keys?", "Who was Albert Einstein?", "What is a volcano?",
    "Which metal is liquid at room temperature?", "What is the largest mammal?",
    "How does a rainbow form?", "What is the Great Wall of China?", "What do caterpillars become?",
    "Which gas do humans breathe out?", "What is the chemical formula of table salt?",
    "Who painted The Starry Night?", "What is gravity?", "How many sides does a hexagon have?",
    "What is the main language of Argentina?", "What do you call a baby cat?",
    "What is the Internet?", "How far is the Moon from the Earth?",
    # writing, advice, explanations
    "Write a two-line poem about autumn.", "Give me three tips for sleeping better.",
    "How do I make a cup of tea?", "Explain what a computer virus is.",
    "Write a polite email asking for a day off.", "What should I pack for a beach holiday?",
    "Describe a cat in one sentence.", "Tell me a short joke.", "How can I learn to cook?",
    "What are the benefits of exercise?", "Give me a motivational quote.",
    "How do plants grow?", "Write a thank-you note to a teacher.",
    "What is a good name for a coffee shop?", "Explain the rules of chess briefly.",
    "Suggest a healthy breakfast.", "How do I stay focused while studying?",
    "What is the difference between weather and climate?",
    "Write a sentence using the word 'bright'.",
    "Why do leaves change colour in autumn?", "Give me a fun activity for a rainy day.",
    "What does a firefighter do?", "Explain what an atom is.", "Write a short story opening.",
    "How do airplanes fly?", "What is a synonym for 'big'?", "What is the plural of 'mouse'?",
    "Summarize the story of Cinderella in one sentence.", "Describe the taste of lemon.",
    "How do I say hello in Spanish?", "What is recycling and why does it matter?",
    "Give me an example of a metaphor.", "What is a healthy way to deal with stress?",
    # chat
    "Hello! How are you today?", "Good morning!", "What can you help me with?",
    "Thanks for your help earlier.", "Tell me something interesting.", "Who are you?",
    "I'm bored. Any ideas?", "Can you recommend a good book?", "What's your favourite colour?",
    "Do you like music?",
)
# fmt: on
