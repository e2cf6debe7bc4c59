"""``cxrlab serve``: an HTTP API and a web page for one model (a checkpoint or an ONNX export).

Stack: FastAPI on uvicorn. FastAPI gives typed endpoints, multipart uploads (through python-multipart)
and the OpenAPI schema from the code itself (``/openapi.json``; ``/docs`` renders it offline); uvicorn is the reference
ASGI server, small and well kept. Both are widely used, so deployment people know them.

Design:

* the model is loaded once, before the server accepts connections; a model that cannot be loaded (a
  corrupt or hash-mismatched ONNX file or sidecar, a corrupt checkpoint) stops the start, naming the file;
* decoding and inference run off the event loop in a bounded pool of ``workers`` threads with a queue
  of ``queue`` more requests: beyond that a request gets 503 at once; one that takes longer than
  ``timeout`` seconds gets 504 (its slot is freed when its work ends, so the bound holds);
* in front of the app, the middleware of :mod:`.security`: Host allow-list (400), optional bearer
  token (401), a cap on uploads in flight (503), the body limit enforced while the body streams in,
  chunked or not, before any parsing (413), a deadline for the body (408), security headers; uploads
  are identified by content (415 for anything but PNG, JPEG, DICOM), their
  declared size is checked before decoding (422 for decompression bombs), and they only ever touch
  a temporary folder of the server's own, emptied after each request;
* labels asked for (``?labels=``) that the model was not trained on come back as ``null``;
* images go through the one preprocessing path and the tolerant batch predictor of ``cxrlab predict``:
  one unreadable file among several gets its ``error`` (and null probabilities), the others their
  answers; a request whose every file is refused gets that refusal's status (415, 422).
"""
# no "from __future__ import annotations": FastAPI reads the endpoint annotations at runtime

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .. import __version__
from ..data.preprocess import content_box
from ..errors import CxrlabError, unknown
from ..model_card import InputSpec
from .api_reference import api_reference_html
from .batch import predict_tolerant
from .interop import outputs as interop
from .overlay import is_flat, map_range, overlay_png, png_bytes, resize_maps
from .predictor import Predictor
from .provenance import provenance
from .security import Guard, allowed_hosts, check_can_listen, check_serve_options, is_loopback
from .uploads import MAX_PIXELS, decode_upload, decode_upload_shaped

MAX_UPLOAD_BYTES = 50 * 2**20
STATIC = Path(__file__).with_name("static")
DISCLAIMER = "Research tool, not a medical device: not for diagnosis or treatment decisions."
PREVIEW_SIZES = (64, 1024)  # /preview and /heatmap's display size: readable, and bounded (memory per request)


def _error(meaning: str, example: str) -> dict:
    return {"description": meaning, "content": {"application/json": {"example": {"detail": example}}}}


# every answer an endpoint can give besides 200, with its meaning (FastAPI's responses=: /docs and the schema)
E413 = {413: _error("request body over the upload limit (refused while it streams in, before parsing)",
                    "request body of 60,000,000 bytes exceeds the limit of 52,428,800 bytes")}
E415 = {415: _error("not a PNG, JPEG or DICOM file, judged by its content whatever its name says",
                    "a.png: not a PNG, JPEG or DICOM file (by its content, which starts with 74 68 69 73)")}
E422 = {422: _error("an image that cannot be decoded, a declared size over the pixel limit (a decompression "
                    "bomb), a missing upload, or a field out of range (unknown label or heatmap method)",
                    "a.png: declared size 20000×20000×1 frames = 400,000,000 pixels exceeds the limit")}
E500 = {500: _error("internal error: this request failed, the server carries on", "internal error: ...")}
E503 = {503: _error("server busy: every worker and queue place is taken; retry later",
                    "server busy: 10 requests in progress; retry later")}
E504 = {504: _error("inference took longer than the server's timeout", "inference took longer than 30 s")}
UPLOAD_ERRORS = {**E413, **E415, **E422, **E503, **E504, **E500}


# ------------------------------------------------------------------------------------------- model

def load_backend(path, threads: int | None = None):
    """The model behind the server: a :class:`~cxrlab.inference.predictor.Predictor` (``*.onnx`` through
    ONNX Runtime, anything else as a checkpoint) on the CPU."""
    return Predictor.load(path, device="cpu", threads=threads)


# ------------------------------------------------------------------------------------- worker pool

class RequestError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class WorkerPool:
    """``workers`` threads and ``queue`` waiting places; full -> 503, slower than ``timeout`` -> 504."""

    def __init__(self, workers: int, queue: int, timeout: float):
        self.executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix="cxrlab-serve")
        self.capacity = max(1, workers) + max(0, queue)
        self.slots = threading.BoundedSemaphore(self.capacity)
        self.timeout = timeout
        self.in_flight = 0
        self._count = threading.Lock()  # released from worker threads, taken on the event loop

    async def run(self, fn, *args):
        if not self.slots.acquire(blocking=False):
            raise RequestError(503, f"server busy: {self.capacity} requests in progress; retry later")
        with self._count:
            self.in_flight += 1

        def release(_):
            with self._count:
                self.in_flight -= 1
            self.slots.release()

        future = self.executor.submit(fn, *args)
        future.add_done_callback(release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except asyncio.TimeoutError:
            raise RequestError(504, f"inference took longer than {self.timeout:g} s") from None
        except (RequestError, CxrlabError):
            raise
        except Exception as exc:  # a bug or a broken model: this request fails (500), the server carries on
            logging.getLogger("cxrlab.serve").exception("inference failed")
            raise RequestError(500, f"internal error: {type(exc).__name__}: {exc}") from None

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------- app

def create_app(model_path, workers: int = 2, queue: int = 8, timeout: float = 30.0,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
               tmp_dir=None, threads: int | None = None, delay: float = 0.0, token: str | None = None,
               hosts=("*",), max_uploads: int | None = None, read_timeout: float = 60.0):
    """The ASGI app (FastAPI wrapped in :class:`.security.Guard`) for one model, loaded now.

    ``token``: required as ``Authorization: Bearer`` on the API (None: no token); ``hosts``: the Host
    names answered (``*``: any); ``max_uploads``: bodies in flight (default: workers + queue);
    ``read_timeout``: seconds for a request body to arrive in full.

    ``threads``: inference threads per worker (default: the cores shared out among the workers).
    ``tmp_dir``: where uploads are decoded (default: a fresh temporary folder, removed at shutdown).
    ``delay``: seconds of sleep added to every inference job (tests of the 503/504 paths only)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    backend = load_backend(model_path, threads or max(1, cores // max(1, workers)))
    own_tmp = tmp_dir is None
    tmp_root = Path(tempfile.mkdtemp(prefix="cxrlab-serve-") if own_tmp else tmp_dir)
    tmp_root.mkdir(parents=True, exist_ok=True)
    pool = WorkerPool(workers, queue, timeout)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        # one warm-up inference: ready means the model answers
        await pool.run(backend.predict_fitted, np.zeros((1, backend.image_size, backend.image_size), np.uint8))
        state["ready"] = True
        yield
        state["ready"] = False
        pool.shutdown()
        if own_tmp:
            shutil.rmtree(tmp_root, ignore_errors=True)

    # docs_url=None: Swagger UI would load its scripts from a CDN; /docs is our offline page instead
    app = FastAPI(title="cxrlab", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"Multi-label chest X-ray classification. {DISCLAIMER}")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(CxrlabError)
    async def _cxrlab_error(request: Request, exc: CxrlabError):
        return JSONResponse({"detail": str(exc)}, status_code=getattr(exc, "status", 422))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # logged by uvicorn; the server carries on
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    def decode(data: bytes, name: str) -> np.ndarray:
        if delay:
            time.sleep(delay)
        return decode_upload(data, name, backend.spec, max_pixels, tmp_root)

    def predict_job(uploads: list[tuple[str, bytes]]):
        probs, failures = predict_tolerant(backend, len(uploads), lambda i: decode(uploads[i][1], uploads[i][0]),
                                           workers=0)
        if all(exc is not None for exc in failures):
            raise failures[0]
        return probs, failures

    def display(data: bytes, name: str, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """The upload through the model's preprocessing at ``size`` px (a readable picture of what the
        model sees, DICOM windowing included) and where the image lies inside the letterbox."""
        spec = InputSpec(size, backend.spec.resize, backend.spec.decoder)
        picture, (h, w) = decode_upload_shaped(data, name, spec, max_pixels, tmp_root)
        return picture, content_box(h, w, size, spec.resize)

    def heatmap_job(name: str, data: bytes, label: int, method: str, size: int | None):
        fitted = decode(data, name)
        probs, heat = backend.heatmaps(fitted, [label], method)
        picture, box = display(data, name, size or backend.image_size)
        if picture.shape != heat[0].shape:
            heat = resize_maps(heat, picture.shape)
        # (probability, PNG, the map's range inside the image, whether that leaves it flat)
        return (float(probs[label]), overlay_png(picture, heat[0], box=box), map_range(heat[0], box),
                is_flat(heat[0], box))

    def preview_job(name: str, data: bytes, size: int) -> bytes:
        if delay:
            time.sleep(delay)
        return png_bytes(display(data, name, size)[0])

    def display_size(size: int | None) -> int | None:
        low, high = PREVIEW_SIZES
        if size is not None and not low <= size <= high:
            raise RequestError(422, f"size must be {low} to {high} pixels, got {size}")
        return size

    def label_index(label: str) -> int:
        if label not in backend.label_names:
            raise RequestError(422, str(unknown("label", label, backend.label_names)))
        return backend.label_names.index(label)

    async def read(files: list[UploadFile], field: str = "files") -> list[tuple[str, bytes]]:
        if not files:
            raise RequestError(422, f"no file uploaded: send the image(s) as the multipart field '{field}'"
                                    + (" (or one as 'file')" if field == "files" else ""))
        return [(f.filename or f"file {i + 1}", await f.read()) for i, f in enumerate(files)]

    @app.post("/predict", summary="Per-label probability, threshold and decision for one or several images",
              description="A file that cannot be read gets its own `error` (and null labels) beside the others' "
                          "answers (200); only when every file is refused does the request get that refusal's "
                          "status (415 or 422).", responses=UPLOAD_ERRORS)
    async def predict(files: list[UploadFile] | None = File(None, description="PNG, JPEG or DICOM files, one "
                                                            "part per image"),
                      file: UploadFile | None = File(None, description="one image, as /heatmap and /preview "
                                                     "take it (instead of files)"),
                      labels: str | None = Query(None, description="comma-separated labels to report "
                                                 "(default: the model's); untrained ones come back null"),
                      format: str = Query("json", description="json; dicom-sr: a DICOM SR per image (one: "
                                          "application/dicom, several: a ZIP); fhir: an R4B Bundle. Both report "
                                          "every label of the model and need the interop extra"),
                      generate_uids: bool = Query(False, description="dicom-sr of a PNG/JPEG: an SR about "
                                                  "made-up UIDs (otherwise 422)")):
        uploads = await read((files or []) + ([file] if file is not None else []))
        headers = interop.http_sources(format, [n for n, _ in uploads], [d for _, d in uploads], generate_uids)
        probs, failures = await pool.run(predict_job, uploads)
        if format != "json":  # DICOM SR / FHIR (inference.interop)
            errors = ["" if exc is None else str(exc) for exc in failures]
            body, media = interop.http_body(format, [n for n, _ in uploads], probs, errors, backend, headers)
            return Response(body, media_type=media)
        wanted = [n.strip() for n in labels.split(",") if n.strip()] if labels else backend.label_names
        results = []
        for (name, _), row, exc in zip(uploads, probs, failures):
            if exc is not None:
                results.append({"file": name, "labels": None, "error": str(exc)})
                continue
            entries = []
            for label in wanted:
                if label in backend.label_names:
                    j = backend.label_names.index(label)
                    p, t = float(row[j]), float(backend.thresholds[j])
                    entries.append({"label": label, "probability": p, "threshold": t, "positive": p >= t,
                                    "trained": True})
                else:
                    entries.append({"label": label, "probability": None, "threshold": None, "positive": None,
                                    "trained": False})
            results.append({"file": name, "labels": entries, "error": None})
        return {"model": backend.identity, "threshold_source": backend.threshold_source, "results": results,
                "disclaimer": DISCLAIMER}

    @app.post("/heatmap", summary="PNG overlay of one label's heatmap on the image as the model sees it",
              description="Jet colours from the map's own minimum (blue) to its maximum (red); the letterbox "
                          "padding of a non-square image is left uncoloured.",
              response_class=Response, responses={200: {"content": {"image/png": {}},
                                                        "description": "the overlay (headers X-Label, "
                                                        "X-Probability, X-Method; X-Map-Range: the map's max "
                                                        "- min on its [0, 1] scale inside the image, and "
                                                        "X-Flat-Map: true when that is below 1/256, i.e. the "
                                                        "map is one colour and shows no spatial evidence)"},
                                                   **UPLOAD_ERRORS})
    async def heatmap(file: UploadFile = File(..., description="one PNG, JPEG or DICOM image"),
                      label: str = Form(..., description="one of the model's labels (see /labels)"),
                      method: str = Form("native", description="native | gradcam | gradcampp"),
                      size: int | None = Form(None, description=f"side of the picture in pixels, "
                                              f"{PREVIEW_SIZES[0]}-{PREVIEW_SIZES[1]} (default: the model's "
                                              "input size); the image is rendered at it through the same "
                                              "preprocessing and the map upsampled")):
        j = label_index(label)
        if method not in backend.methods:
            available = ", ".join(backend.methods) or "none for this head"
            raise RequestError(422, f"heatmap method {method!r} is not available for this model "
                                    f"({backend.runtime}; available: {available})")
        size = display_size(size)
        (name, data), = await read([file], "file")
        probability, png, spread, flat = await pool.run(heatmap_job, name, data, j, method, size)
        return Response(png, media_type="image/png",
                        headers={"X-Label": label, "X-Probability": f"{probability:.6f}", "X-Method": method,
                                 "X-Map-Range": f"{spread:.6f}", "X-Flat-Map": "true" if flat else "false"})

    @app.post("/preview", summary="PNG of the image itself through the model's preprocessing, at a readable size",
              description="The same decoding (DICOM windowing, 16-bit scaling), orientation and letterbox as "
                          "the model input, rendered at `size` pixels instead of the model's input size.",
              response_class=Response, responses={200: {"content": {"image/png": {}},
                                                        "description": "the grey picture"}, **UPLOAD_ERRORS})
    async def preview(file: UploadFile = File(..., description="one PNG, JPEG or DICOM image"),
                      size: int = Form(512, description=f"side in pixels, {PREVIEW_SIZES[0]}-{PREVIEW_SIZES[1]}")):
        size = display_size(size)
        (name, data), = await read([file], "file")
        return Response(await pool.run(preview_job, name, data, size), media_type="image/png")

    @app.get("/labels", summary="The model's labels, thresholds and where the thresholds came from",
             responses=E500)
    async def get_labels():
        return {"labels": [{"label": n, "threshold": float(t)} for n, t in zip(backend.label_names, backend.thresholds)],
                "threshold_source": backend.threshold_source, "heatmap_methods": list(backend.methods),
                "image_size": backend.image_size}

    @app.get("/health", summary="200 once the model is loaded and has answered, 503 before",
             responses={503: {"description": "the model is still loading (or the server is stopping)"}})
    async def health():
        body = {"status": "ready" if state["ready"] else "loading", "in_flight": pool.in_flight,
                "capacity": pool.capacity}
        return JSONResponse(body, status_code=200 if state["ready"] else 503)

    origin = provenance(backend.card, backend.identity, model_path)

    @app.get("/version", summary="cxrlab and runtime versions, the model's identity and provenance",
             description="provenance: the training data source and its kind (synthetic / real / unknown), the "
                         "recipe, the date and the model's SHA-256, as the web page shows them.", responses=E500)
    async def version():
        return {"cxrlab": __version__, "runtime": backend.runtime, "model": backend.identity, "provenance": origin}

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(api_reference_html(app.openapi()))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.backend, app.state.pool, app.state.tmp_root = backend, pool, tmp_root
    wrapped = Guard(app, max_upload_bytes, token=token, hosts=hosts, max_uploads=max_uploads or pool.capacity,
                    read_timeout=read_timeout, spool_dir=tmp_root)
    wrapped.app_state = app.state
    return wrapped


def serve(model_path, host: str = "127.0.0.1", port: int = 8000, workers: int = 2, queue: int = 8,
          timeout: float = 30.0, max_upload_mb: float = 50.0, log_level: str = "info", token: str | None = None,
          hosts: str | None = None, max_uploads: int | None = None, read_timeout: float = 60.0,
          allow_remote_without_token: bool = False) -> None:
    """Load the model and serve it until interrupted (``cxrlab serve``); every option is checked, and the
    port tried, before the model is loaded. ``hosts``: comma-separated Host names (see
    :func:`.security.allowed_hosts`)."""
    import uvicorn

    check_serve_options(host, port, workers, queue, timeout, max_upload_mb, read_timeout, max_uploads, token,
                        allow_remote_without_token)
    names = allowed_hosts(host, hosts)
    check_can_listen(host, port)
    log = logging.getLogger("cxrlab.serve")
    app = create_app(model_path, workers=workers, queue=queue, timeout=timeout,
                     max_upload_bytes=int(max_upload_mb * 2**20), token=token, hosts=names,
                     max_uploads=max_uploads, read_timeout=read_timeout)
    log.info("answering Host %s%s", ", ".join(names), "; token required on the API" if token else "")
    if not is_loopback(host):
        log.warning("%s is reachable from other machines over plain HTTP%s: put a TLS reverse proxy in front "
                    "(README: Running it safely)", host, "" if token else " and WITHOUT a token")
    # Starlette spools large multipart parts to temporary files: keep those inside our own folder too
    previous_tempdir, tempfile.tempdir = tempfile.tempdir, str(app.app_state.tmp_root)
    try:
        # timeout_keep_alive: an idle kept-alive connection is closed after 5 s; h11_max_incomplete_event_size:
        # request line + headers capped at 16 KiB. The body's deadline is the middleware's (read_timeout).
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                    h11_max_incomplete_event_size=16 * 2**10)
    finally:  # a start that fails (or a server that stops) leaves no temporary folder behind
        tempfile.tempdir = previous_tempdir
        shutil.rmtree(app.app_state.tmp_root, ignore_errors=True)
