"""Scoring samples: the evaluator CNN, metrics (accuracy, toy-FID, palette distance, overlaps), the reusable evaluations, image grids."""
