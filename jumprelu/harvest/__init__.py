"""Gemma: texts and tokenizer, the model and its sites, the harvest into activation stores, and
delta LM loss with an SAE spliced in (imports gemma; never imported by training)."""
