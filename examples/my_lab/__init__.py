"""A team's own parts for mim, outside mim's tree: a target, a model transform and a task
(docs/extending.md). Put the directory holding `my_lab` on PYTHONPATH and name them by path."""
