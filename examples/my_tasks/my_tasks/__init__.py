"""A small application's Celery tasks (an example for labkit's pytest plugin)."""
