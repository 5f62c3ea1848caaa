"""Small controlled experiments: one variable changed, everything else fixed, a picture at the end."""
