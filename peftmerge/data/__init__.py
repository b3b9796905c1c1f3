"""Tasks and their rows (:mod:`.tasks`), the prompts built from them (:mod:`.prompts`) and a model's batched
predictions on them (:mod:`.predict`): what training, routing, evaluation and search all read."""
