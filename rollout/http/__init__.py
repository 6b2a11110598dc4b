"""HTTP server: SGLang's native endpoints and the OpenAI API over one in-process engine
(``EngineBackend``) or the Ray rollout service (``ServiceBackend``).

``build_app(backend, config)`` is the FastAPI app; ``rollout.http.server.serve`` runs it under
uvicorn until SIGINT/SIGTERM (``rollout serve``).
"""

from rollout.http.app import build_app
from rollout.http.config import HTTPConfig

__all__ = ["HTTPConfig", "build_app"]
