"""What a task type optimises and reports (loss, class balance, scores, metrics)."""
