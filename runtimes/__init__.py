"""Runtime adapters: one per engine, driven by one table (:data:`ENGINES`).

The SDK only calls :func:`open_session`, which returns an object with
``run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]``.
"""
from .session import Session, open_session  # noqa: F401
