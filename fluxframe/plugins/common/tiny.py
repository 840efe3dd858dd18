"""The text the tiny random tokenizers (of the presets' and the tests' stand-in text encoders) are trained on:
a few dozen sentences of the kind prompts are made of, so they tokenize into more than single bytes."""

CORPUS = """\
You are an AI that reasons about image descriptions and object relationships without speculation.
A red circle sits beside a blue square on a white table.
The green triangle floats above a yellow hexagon under soft morning light.
An orange cube rests on a purple cylinder in a quiet photography studio.
A small grey cat sleeps near a window while rain falls over the city.
Snowy mountains rise behind a frozen lake at dawn, pink clouds drifting overhead.
A lighthouse stands on rocky cliffs as stormy waves crash far below.
Two wooden chairs face a crackling fireplace inside a cozy cabin.
A ceramic bowl of ripe strawberries glistens on a polished marble countertop.
Neon signs reflect on wet pavement in a crowded night market.
A golden retriever runs across a meadow full of wildflowers and tall grass.
An astronaut walks slowly across the dusty surface of the moon.
A steaming cup of coffee sits next to an open leather notebook and a fountain pen.
Brass gears and copper pipes fill the workshop of an old clockmaker.
A silver bicycle leans against a brick wall covered with ivy.
Turquoise water laps at a sandy beach lined with coconut palms.
A medieval castle with crimson banners towers over a misty valley.
Glass bottles of every colour catch the sunset on a kitchen shelf.
A child in a bright raincoat jumps into a muddy puddle.
Autumn leaves swirl around a stone fountain in an empty park.
A vintage typewriter, a stack of letters and a candle share a dark desk.
Paper lanterns glow above a narrow street lined with tea houses.
A black and white photograph of a jazz trio playing in a smoky club.
Thick fog rolls between the towers of a suspension bridge.
A hummingbird hovers beside a magenta hibiscus blossom.
Chess pieces carved from jade stand on a checkered board of ebony and ivory.
A watercolour painting of sailboats drifting on a calm harbour at noon.
A futuristic train glides silently through a desert of orange dunes.
Frost patterns spread across a windowpane on a winter morning.
A bakery display holds croissants, baguettes and cinnamon rolls dusted with sugar.
Lightning splits a violet sky above a lonely farmhouse.
A koi pond shimmers beneath a wooden footbridge in a Japanese garden.
An isometric illustration of a tiny island with a windmill and three sheep.
A robot with round eyes waters potted cacti on a sunny balcony.
Macro shot: dewdrops cling to a spider web strung between blades of grass.
Text on the poster reads "OPEN LATE" in bold yellow letters.
A pyramid of oranges, lemons and limes balanced on a market stall.
Close-up portrait of an elderly fisherman with a weathered face and knitted cap.
Low-poly render of a fox curled up inside a hollow log.
Sunlight streams through stained glass, scattering emerald and sapphire patches on the floor.
"""
