"""One module per resource: health, models, sessions, predict."""
