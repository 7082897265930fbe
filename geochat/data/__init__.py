"""Training data from real remote-sensing annotations: loaders (one per data set) and the builder of
LLaVA-format instruction conversations (`instruct`)."""
