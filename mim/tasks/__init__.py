"""The training tasks (mim.engine.task.Task): what a run trains and evaluates."""
