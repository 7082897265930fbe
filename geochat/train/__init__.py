"""Scripted training runs: a YAML recipe (align → pretrain → instruct, and retrieval) run by `geochat train` or
`accelerate launch -m geochat.train RECIPE.yaml`; see `recipe` for the format and `run` for the layout."""
