"""Runtime adapters: one per engine, driven by one table (:data:`ENGINES`).

The SDK only calls :func:`open_session`, which returns an object with
``run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]``;
:func:`kpface.runtimes.build.build` makes the engine
artifacts it opens (``MODEL_DIR/builds/<runtime>-<precision>-<device key>/``).
"""
from .engines import ENGINES, get_engine  # noqa: F401
from .session import Session, open_session  # noqa: F401
