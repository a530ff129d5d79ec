"""A short, fixed English corpus for training the small benchmark tokenizer offline.

About shapes, colours, positions and visual metaphors, so that the tiny and small benchmark
models see plausible token statistics. `corpus_lines()` is deterministic: the same lines in the
same order on every call and machine.
"""

SHAPES = (
  "circle square triangle rectangle oval star heart diamond hexagon pentagon octagon arrow cross "
  "crescent spiral ring cube sphere cone cylinder pyramid line curve dot wave zigzag"
).split()
COLOURS = (
  "red orange yellow green blue purple violet pink brown black white grey gold silver teal navy "
  "crimson scarlet amber ivory olive maroon turquoise indigo beige"
).split()
POSITIONS = [
  "above", "below", "beside", "behind", "in front of", "inside", "outside", "next to", "on top of",
  "underneath", "to the left of", "to the right of", "near", "far from", "between", "around",
  "across from", "in the corner of", "at the centre of", "along the edge of",
]
PROSE = """
You are a helpful assistant. The user shows you a picture and asks a question about it. Look at the
image carefully, describe what you see, and then answer the question. Is the statement true or
false? Answer yes or no, and explain your reasoning in one or two short sentences.

A metaphor says that one thing is another thing. Time is a thief. The city is a jungle. Her voice
was music to his ears. A simile uses like or as: the moon was like a silver coin, the child ran as
fast as the wind. An image can carry a metaphor too. A melting clock suggests that time slips away.
A lighthouse in a storm suggests hope, guidance and safety. A cracked mirror may stand for a broken
identity, while an open cage with a bird flying out often means freedom, escape or release. A
ladder that reaches into the clouds hints at ambition; a bridge between two cliffs speaks of
connection, compromise and reconciliation.

Advertisements and cartoons rely on visual rhetoric. A toothbrush drawn as a sword claims that the
paste fights germs. A planet wrapped in plastic warns about pollution. A heart built from puzzle
pieces shows that love needs patience and effort. A tree whose roots are cables links nature with
technology. When a politician is drawn as a puppet, the strings imply that someone else controls
his choices. Readers must infer the hidden meaning, the implied message, the irony, the
exaggeration and the symbolism.

Spatial words matter as well. Something may be above, below, beside, behind, inside, outside,
between, around, across, along, over, under, near or far. Objects can be small, medium, large,
huge, tiny, tall, short, wide, narrow, thick, thin, round, sharp, smooth, rough, bright, dark,
pale, vivid, faded, empty or full. They may be standing, sitting, lying, floating, falling, rising,
spinning, leaning, hanging, touching, overlapping, crossing, pointing, facing or turning. Count
them: zero, one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty,
hundred, thousand; first, second, third, last.

Colours carry feelings. Red signals danger, anger, passion or urgency. Blue feels calm, cold, sad
or trustworthy. Green stands for growth, envy, money and nature. Yellow is cheerful but can warn of
caution. Black suggests mourning, power, mystery and elegance; white suggests purity, peace,
emptiness and surrender. Grey is neutral, dull or uncertain. Purple has long meant royalty, luxury
and imagination.

People, animals and things appear in scenes: a man, a woman, a boy, a girl, a family, a crowd, a
teacher, a doctor, a worker, a soldier, a king, a queen, a dog, a cat, a horse, a fish, a lion, a
snake, an eagle, a tree, a flower, a mountain, a river, an ocean, a desert, a forest, a road, a
house, a building, a window, a door, a wall, a table, a chair, a book, a phone, a computer, a
screen, a camera, a car, a train, a ship, a plane, a rocket, a key, a lock, a chain, a rope, a
knife, a hammer, a candle, a lamp, a bulb, a clock, a watch, a coin, a wallet, a bag, a box, a
bottle, a glass, a cup, a plate, a bowl, a shoe, a hat, a mask, a shadow, a reflection, a storm,
the rain, the snow, the sun, the sky, the clouds and fire.

Questions and answers follow a pattern. What does the picture imply? Which object is larger? Where
is the ball? How many stars are there? Why is the man smiling? Who is holding the umbrella? The
correct answer is the option that matches the intended meaning. Think step by step, check each
detail, compare alternatives, and choose carefully. If the evidence is weak, say that you are not
sure. Do not invent details that are not visible. Keep the final answer brief, clear, accurate,
honest and useful.

Training a model with reinforcement learning rewards good answers. The policy samples several
completions for every prompt, a reward function scores them, and the advantages push the
probabilities of better responses upward and worse responses downward. Learning rates, batches,
gradients, losses, tokens, steps, epochs, checkpoints, evaluations, metrics, accuracy, precision,
recall, entropy and divergence are the everyday vocabulary of this work.
"""
# Extra word forms give the BPE trainer enough distinct words to reach 2000 tokens.
SUFFIXES = [
  "s", "ed", "ing", "ly", "ness", "er", "est", "ful", "less", "ish", "ity", "ment", "able",
]


def corpus_lines() -> list[str]:
  """The corpus, one sentence or prose line per item."""
  lines = [line for line in PROSE.splitlines() if line.strip()]
  # Every shape in every colour, related to another coloured shape by a position.
  for i, shape in enumerate(SHAPES):
    for j, colour in enumerate(COLOURS):
      position = POSITIONS[(i * 7 + j * 3) % len(POSITIONS)]
      other_shape = SHAPES[(i + j + 1) % len(SHAPES)]
      other_colour = COLOURS[(i * 3 + j + 2) % len(COLOURS)]
      lines.append(f"A {colour} {shape} is {position} the {other_colour} {other_shape}.")
  words = sorted({word.strip(".,;:?!").lower() for line in lines for word in line.split()})
  for k, word in enumerate(words):
    forms = [word + SUFFIXES[(k + m) % len(SUFFIXES)] for m in range(3)]
    lines.append(" ".join([word.capitalize(), *forms]))
  return lines
