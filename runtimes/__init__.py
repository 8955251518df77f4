"""Runtime adapters: one per engine, driven by one table (:data:`ENGINES`).

The SDK only calls :func:`open_session` (the dispatcher, :mod:`.session`), which returns a
:class:`Session`: ``run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]``.
:func:`kpface.runtimes.build.build` makes the engine artifacts it opens
(``MODEL_DIR/builds/<runtime>-<precision>-<device key>/``); :mod:`.gates` measures them.
"""
from .engines import ENGINES, Session, default_threads, get_engine  # noqa: F401
from .session import open_session  # noqa: F401
