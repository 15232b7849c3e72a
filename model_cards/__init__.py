"""Jinja templates of the model cards ame-hf writes (installed as `ame_hf.model_cards`)."""
