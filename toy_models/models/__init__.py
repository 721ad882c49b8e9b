"""The toy networks and how to run them: the tiny DiT and its layers, the text encoder, the conditioning object, few-step sampling, classifier-free guidance, loading the shipped weights."""
