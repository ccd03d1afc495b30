"""A two-task flow on embedded Prefect: the fixed cost of starting Prefect, for comparison with real runs."""

import tasks  # noqa: F401  (project Prefect defaults, before prefect is imported)
from prefect import flow, task


@task
def add(a: int, b: int) -> int:
    return a + b


@flow(name="trivial")
def trivial() -> int:
    return add(add(1, 2), 3)


if __name__ == "__main__":
    assert trivial() == 6
