"""The paper's claim as a benchmark: a baseline family against a HydraNet family, trained alike.

A protocol (YAML) names shared settings, the baseline family, the baseline (or check) the subtasks come from,
the HydraNet family, ablations, checks and repeats (members trained again, e.g. with another seed).
Every model is its own resumable run folder; evaluation runs all models on one test set in one
process, and the comparison is reported as the iso-accuracy saving (baseline MACs / HydraNet MACs at
the same top-1) and the equal-cost accuracy gain, in counted multiply-adds and in measured time;
with repeats, also on each member's mean over its runs.

``protocol``: reading and checking a protocol, and each entry's training config; ``run``: training what is missing
and evaluating every model in one process; ``compare``: the two families' curves compared (savings, gains, means
over seeds, seed noise); ``results``: the JSON, plots and Markdown report written.
"""
