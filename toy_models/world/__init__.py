"""The toy world itself: vocabulary, procedural images and captions, held-out concept sets, the base-training mixture, user-style image folders."""
