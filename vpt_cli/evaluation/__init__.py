"""Scoring a task: metrics, plots and the HTML report."""
