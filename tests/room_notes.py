"""Ten one-sentence notes, each naming an object, a room and a shelf, and a question about one of
them (note 2, the violin's): the memory the router server tests route over."""

OBJECTS = ["lamp", "clock", "violin", "kettle", "map", "anchor", "ledger", "compass", "basket", "mirror"]
SHELVES = ["north", "green", "tall", "old", "west", "blue", "low", "east", "small", "red"]
DOCUMENTS = [f"Note {i}: the {word} is kept in room {i * 37 % 100} near the {other} shelf."
             for i, (word, other) in enumerate(zip(OBJECTS, SHELVES))]
QUESTION = "Where is the violin kept?"
