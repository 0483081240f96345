"""Training a task: run folder, prepared data, the epoch loop, resume, probe and sweep."""
