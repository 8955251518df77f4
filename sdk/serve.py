"""``kpface serve``: the face pipeline as a Ray Serve application, HTTP JSON on 127.0.0.1.

Two deployments: ``detector``, the HTTP ingress, decodes the image, detects and aligns the faces
(:class:`~kpface.serving.DetectStage`, in a worker thread) and hands the crops to
``recognizer`` (:class:`~kpface.serving.EmbedStage`), which batches requests with
``@serve.batch``: the faces of requests that arrive while it is busy go through the recognizer
in one call. Detection being the ingress saves a hop (and moving the image between processes):
each hop between Serve processes costs milliseconds.

Endpoints (JSON bodies with the image file's bytes base64-encoded in ``"image"``; or the file
itself as the body, with ``Content-Type: image/...`` and ``k`` in the query string)::

    POST /embed     {"image": B64}          -> {"faces": [{box, score, landmarks, embedding}],
                                                "models": {stage: {arch, weights}},
                                                "ms": {detect, embed, total}}
    POST /identify  {"image": B64, "k": 5}  -> faces with "candidates" [{id, score}] from
                                               gallery.search and "match" from gallery.identify
                                               (null, with "no_verdict" saying why, when the
                                               recognizer has random weights)
    GET  /health                            -> {"status": "ok", "gallery": rows or null}
    GET  /                                  -> the models and endpoints

A bad request gets a 4xx status and ``{"error": "one line"}``. The gallery for ``/identify`` is
the one given at start (``--gallery G``), opened once per detector replica.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import importlib
import json
import logging
import time
from typing import Any, Callable

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from .errors import EngineUnavailable, InputError, KpfaceError, RandomWeightsError
from .serving import DetectStage, EmbedStage, check_k, jsonable, stages_info

log = logging.getLogger(__name__)

APP_NAME = "kpface"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 32 << 20
GALLERY_OPENER = "kpface.gallery:open_for_models"  # (path, models_dir, **options)


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def resolve(spec: str | Callable) -> Callable:
    """``"module:attr.attr"`` -> the object (a callable passes through)."""
    if callable(spec):
        return spec
    module, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        raise EngineUnavailable(f"{module} is not installed, so no gallery can be opened "
                                "(it comes with kpface's gallery support)") from None
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@serve.deployment(name="recognizer")
class Recognizer:
    def __init__(self, models_dir: str, threads: int = 1, max_batch_size: int = 8,
                 batch_wait_s: float = 0.0, **options):
        self.stage = EmbedStage(models_dir, threads=threads, **options)
        self.embed_batch.set_max_batch_size(max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.counts = {"requests": 0, "batches": 0, "largest": 0}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def embed_batch(self, requests: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        c = self.counts
        c["requests"] += len(requests)
        c["batches"] += 1
        c["largest"] = max(c["largest"], len(requests))
        # In a thread, so requests that arrive meanwhile queue up for the next batch.
        return await asyncio.to_thread(self.stage.embed_many, requests)

    def stats(self) -> dict[str, int]:
        """Requests embedded, batches run and the largest batch (in requests) so far."""
        return dict(self.counts)

    async def __call__(self, crops: np.ndarray, points: np.ndarray) -> np.ndarray:
        return await self.embed_batch((crops, points))


@serve.deployment(name="detector")
class Detector:
    """The HTTP ingress and the detection stage; embeds through the recognizer's handle."""

    def __init__(self, recognizer, models_dir: str, info: dict, threads: int = 1,
                 gallery_path: str | None = None,
                 gallery_opener: str | Callable = GALLERY_OPENER, allow_random: bool = False,
                 **options):
        self.stage = DetectStage(models_dir, threads=threads, **options)
        self.recognizer, self.info, self.allow_random = recognizer, info, allow_random
        # One thread owns the gallery (SQLite connections belong to the thread that opened them).
        self._gallery_thread = concurrent.futures.ThreadPoolExecutor(1, "kpface-gallery")
        self.gallery = None
        if gallery_path:
            # The gallery is opened for this server's recognizer: one whose embeddings come
            # from another model is refused.
            opener = resolve(gallery_opener)
            rec = {k: options[k] for k in ("runtime", "precision") if k in options}
            self.gallery = self._gallery_thread.submit(opener, gallery_path, models_dir,
                                                       **rec).result()

    async def _on_gallery(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._gallery_thread, fn, *args)

    async def __call__(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            path, method = request.url.path.rstrip("/") or "/", request.method
            routes = {"/": ("GET", self.index), "/health": ("GET", self.health),
                      "/embed": ("POST", self.embed), "/identify": ("POST", self.identify)}
            if path not in routes:
                raise HttpError(404, f"no endpoint {path}; use one of {', '.join(routes)}")
            want, handler = routes[path]
            if method != want:
                raise HttpError(405, f"{path} takes {want}, not {method}", {"Allow": want})
            body = await handler(request)
            body.setdefault("ms", {})["total"] = round((time.perf_counter() - t0) * 1e3, 2)
            return JSONResponse(body)
        except HttpError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status, headers=e.headers)
        except InputError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except Exception as e:  # a bug or a broken model: still one line
            log.exception("request failed")
            return JSONResponse({"error": f"internal error: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''}"},
                                status_code=500)

    async def index(self, request: Request) -> dict:
        return {"models": self.info, "gallery": self.gallery is not None,
                "endpoints": {"POST /embed": {"image": "base64 of an image file (or the file "
                                              "as the body, Content-Type image/...)"},
                              "POST /identify": {"image": "as for /embed",
                                                 "k": "candidates per face, 1-100 (default 5; "
                                                 "?k= with a file body)"},
                              "GET /health": {}}}

    async def health(self, request: Request) -> dict:
        rows = None if self.gallery is None else await self._on_gallery(len, self.gallery)
        return {"status": "ok", "gallery": rows}

    async def _read(self, request: Request) -> tuple[bytes, dict]:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise HttpError(413, f"the request body is {int(size)} bytes; the limit is "
                            f"{MAX_BODY_BYTES} (send a smaller or compressed image)")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise HttpError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            # The file itself as the body (a third smaller than base64 in JSON); k in the query.
            k = request.query_params.get("k")
            if k is not None and not k.isdigit():
                raise InputError(f"k must be an integer from 1 to 100, got {k!r}")
            return raw, {} if k is None else {"k": int(k)}
        try:
            req = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HttpError(400, f"the body is not JSON ({e}); send {{\"image\": BASE64}}") from None
        if not isinstance(req, dict):
            raise HttpError(400, "the body must be a JSON object like {\"image\": BASE64}")
        b64 = req.get("image")
        if not isinstance(b64, str) or not b64:
            raise HttpError(400, "\"image\" is missing: send the image file's bytes, "
                            "base64-encoded, as {\"image\": BASE64}")
        if b64.startswith("data:") and "," in b64:  # a data URL
            b64 = b64.split(",", 1)[1]
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise HttpError(400, "\"image\" is not valid base64") from None
        return data, req

    async def _faces(self, data: bytes) -> tuple[list, np.ndarray, dict]:
        """Faces with embeddings, and the milliseconds spent detecting (decode, detect, align,
        in this replica) and embedding (the round trip to the recognizer)."""
        t0 = time.perf_counter()
        # In a thread: the event loop keeps taking requests (and health checks) meanwhile.
        det = await asyncio.to_thread(self.stage, data)  # InputError -> 400
        t1 = time.perf_counter()
        faces, emb = det["faces"], np.zeros((0, 0), np.float32)
        if faces:
            emb = await self.recognizer.remote(det["crops"], det["points"])
            for face, e in zip(faces, emb):
                face.embedding = e
        ms = {"detect": round((t1 - t0) * 1e3, 2),
              "embed": round((time.perf_counter() - t1) * 1e3, 2)}
        return faces, emb, ms

    async def embed(self, request: Request) -> dict:
        data, _ = await self._read(request)
        faces, _, ms = await self._faces(data)
        return {"faces": [f.to_dict(embedding=True) for f in faces], "models": self.info,
                "ms": ms}

    async def identify(self, request: Request) -> dict:
        if self.gallery is None:
            raise HttpError(404, "this server has no gallery; start it with "
                            "`kpface serve --gallery G`")
        data, req = await self._read(request)
        k = check_k(req.get("k", 5))
        faces, emb, ms = await self._faces(data)
        out = []
        if faces:
            ids, scores = await self._on_gallery(self.gallery.search, emb, k)
            for i, face in enumerate(faces):
                d = face.to_dict(embedding=False)
                d["candidates"] = [{"id": jsonable(j), "score": round(float(s), 6)}
                                   for j, s in zip(ids[i], scores[i]) if j is not None]
                try:
                    d["match"] = jsonable(await self._on_gallery(
                        self.gallery.identify, emb[i], self.allow_random))
                except RandomWeightsError as e:  # scores yes, an identity verdict no
                    d["match"], d["no_verdict"] = None, str(e)
                out.append(d)
        return {"faces": out, "models": self.info, "ms": ms}


def build_app(models_dir: str, threads: int = 1, gallery: str | None = None,
              replicas: int = 1, cpus_per_replica: float | None = None,
              max_batch_size: int = 8, batch_wait_ms: float = 0.0,
              gallery_opener: str | Callable = GALLERY_OPENER, use_keypoints: bool = True,
              allow_random: bool = False, min_face: float | None = None,
              score: float | None = None, **pipeline_options):
    """The bound application: the detector (HTTP ingress) in front of the recognizer.

    ``min_face`` / ``score``: what the detector reports (None: its defaults; see
    :mod:`kpface.models.mtcnn`).

    ``batch_wait_ms`` 0 batches what queued up while the recognizer was busy, and adds no
    wait to a lone request; a longer wait forms larger batches at a light load.
    """
    if threads < 1 or replicas < 1 or max_batch_size < 1 or batch_wait_ms < 0:
        raise InputError("threads, replicas and max batch size must be >= 1, the batch wait >= 0")
    cpus = float(threads if cpus_per_replica is None else cpus_per_replica)
    opts = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": cpus}}
    rec = Recognizer.options(**opts).bind(models_dir, threads=threads,
                                          max_batch_size=max_batch_size,
                                          batch_wait_s=batch_wait_ms / 1e3, **pipeline_options)
    info = stages_info(models_dir, use_keypoints=use_keypoints)
    return Detector.options(**opts).bind(rec, models_dir, info, threads=threads,
                                         gallery_path=gallery, gallery_opener=gallery_opener,
                                         allow_random=allow_random, use_keypoints=use_keypoints,
                                         min_face=min_face, score=score, **pipeline_options)


def check_address(host: str, port: int) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise InputError(f"kpface serve listens on loopback only (127.0.0.1), not {host}; put a "
                         "reverse proxy in front of it to expose it")
    if not 0 < port < 65536:
        raise InputError(f"port must be from 1 to 65535, got {port}")


def start(app, port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> str:
    """Start Serve's HTTP proxy on ``host:port`` (head node only) and deploy ``app``; returns
    the base URL. Only loopback hosts are accepted."""
    check_address(host, port)
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except KpfaceError:
        raise
    except Exception as e:  # a replica failed to start (its constructor raised)
        raise KpfaceError(f"the kpface Serve application did not start: "
                          f"{str(e).strip().splitlines()[-1][:300]}") from None
    return f"http://{host}:{port}"


def stop() -> None:
    """Delete the kpface application (leaving Serve and the cluster running)."""
    serve.delete(APP_NAME)
