"""Training: recipes, the loop, checkpoints, EMA, data from the panorama world."""
