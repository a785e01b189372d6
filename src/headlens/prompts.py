"""Prompts headlens uses by default."""

# The prompt of the residual-stream notebook (the second seed), verbatim. With the Qwen3 tokenizer it gives
# the 404 tokens whose labels the notebook lists.
NOTEBOOK_PROMPT = (
    'The Eiffel Tower was originally intended to be dismantled after twenty years. Neural networks '
    'sometimes behave unpredictably when initialized with poor random seeds. Octopuses have three hearts, '
    'and two of them stop beating when they swim. If you multiply two rotation matrices, the result is '
    'another valid rotation matrix. The smell of fresh rain is partly caused by a compound called '
    'geosmin. In LaTeX, the tikz package lets you create vector graphics directly within documents. '
    'Bananas are technically berries, but strawberries are not. Quantum entanglement has been '
    'experimentally demonstrated over distances exceeding 1,000 kilometers. The longest chess game '
    'theoretically possible under current rules is 5,949 moves. Clouds can weigh millions of kilograms, '
    'yet remain suspended in the air. The prime number theorem gives an asymptotic estimate for the '
    'distribution of primes. Some species of ants farm aphids to harvest their sugary secretions. In '
    'PyTorch, gradient accumulation is often used when the GPU cannot fit large batches. Shakespeare '
    'invented, or at least popularized, over 1,700 English words. Black holes can theoretically evaporate '
    'over time through Hawking radiation. The mitochondrion is often called the powerhouse of the cell, '
    'though chloroplasts generate energy too. Airplane contrails can influence local climate patterns by '
    'trapping heat. In category theory, a functor maps objects and morphisms between categories. The '
    'Great Wall of China is not a single continuous wall but a series of fortifications. Sorting '
    'algorithms like quicksort and mergesort have different average- and worst-case complexities. '
    'Pufferfish inflate themselves by rapidly ingesting water (or air when on land). In probability, the '
    'law of large numbers states that sample averages converge to expected values. Mount Everest '
    'continues to grow taller by a few millimeters each year due to tectonic activity. The Collatz '
    'conjecture remains unsolved despite its deceptively simple definition. Some frogs can survive being '
    'frozen solid and thawing back to life.'
)
