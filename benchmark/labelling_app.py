"""The labelling web app: one candidate at a time, keyboard first, every label stored at once.

A FastAPI application over a :class:`~invarbench.labelling.LabelStore`, served by uvicorn. The page
never shows the original test image or its label (they would bias the reading). Keys: 0-9 label,
``n`` not a digit, ``?`` unsure, Backspace undo. Each annotator resumes at their first unlabelled item.

Who labels: once anyone was invited to the database (``invarbench label invite``), and always on an
address other than loopback, every request carries an invitation token (``Authorization: Bearer TOKEN``;
the invitation link holds it after ``#token=``, which browsers never send to a server) and the
annotator's name comes from the token alone. A loopback server of a database nobody was invited to
takes the name the person at this machine types. An annotator labels the item the server shows them,
so a retried or stale request is answered 409 and never stores a label twice.
"""

from __future__ import annotations

import ipaddress
import socket
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from invarbench.errors import ConfigError, InvarbenchError
from invarbench.labelling import LABELS, LabelStore, check_annotator_name, png_bytes

#: The largest request body taken: a label request is about 40 bytes.
MAX_BODY_BYTES = 1024
ROUTES = "GET /, GET /api/next, GET /image/ID.png, POST /api/label, POST /api/undo"
EXAMPLE_BODIES = {"/api/label": '{"item": 12, "label": "7"}', "/api/undo": "{}"}
#: The token of ``Authorization: Bearer TOKEN``, None when the header is missing or not of that form.
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer"><title>invarbench label</title>
<style>
body { font-family: sans-serif; max-width: 46rem; margin: 2rem auto; color: #222; }
#image {
  width: 280px; height: 280px; image-rendering: pixelated; border: 1px solid #888; display: block; margin: 1rem 0;
  background: #000;
}
#bar { width: 100%; height: 1rem; }
button { font-size: 1.1rem; min-width: 2.4rem; margin: 0.1rem; }
#who { margin-bottom: 1rem; } .hint { color: #666; font-size: 0.9rem; } #error { color: #b00; }
</style></head><body>
<h1>What digit is this?</h1>
<form id="who" hidden>
  <label>Annotator <input id="annotator" name="annotator" autocomplete="off"></label>
  <button type="submit">start</button>
</form>
<div id="work" hidden>
<progress id="bar" max="1" value="0" aria-label="labelled by you"></progress><p id="progress"></p>
<img id="image" alt="image to label" style="visibility: hidden">
<p id="done" hidden>All items labelled. Thank you.</p>
<div id="buttons"></div>
<p class="hint">Keys: 0-9 the digit you read, n not a digit, ? unsure, Backspace undo (back to the previous image).</p>
<p id="error" role="alert"></p>
</div>
<script>
const labels = LABELS_JSON;
// An invitation link carries the token after #token=; without one, a name typed here (loopback servers
// nobody was invited to only).
const token = new URLSearchParams(location.hash.slice(1)).get("token");
let annotator = token ? null : new URLSearchParams(location.search).get("annotator") || "";
// current: the item on screen; ready: its image has loaded (a key never labels an image not yet seen);
// busy: a request is in flight (a second key waits for the next image instead of labelling this one twice).
let current = null, ready = false, busy = false;
async function request(path, body) {
  const headers = token ? {"Authorization": "Bearer " + token} : {};
  if (body) headers["Content-Type"] = "application/json";
  const payload = token ? body : {...body, annotator};
  const options = body ? {method: "POST", headers, body: JSON.stringify(payload)} : {headers};
  const response = await fetch(path, options);
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (error) {}
    throw new Error(detail);
  }
  return response;
}
async function call(path, body) {
  return (await request(token || body ? path : path + "?annotator=" + encodeURIComponent(annotator), body)).json();
}
function progress(state) {
  const bar = document.getElementById("bar");
  bar.max = Math.max(1, state.total); bar.value = state.done;
  document.getElementById("progress").textContent =
    state.done + " / " + state.total + " labelled by " + state.annotator;
}
function failed(error) { document.getElementById("error").textContent = error.message; }
function show(state) {
  const image = document.getElementById("image");
  document.getElementById("done").hidden = state.item !== null;
  if (state.item === null || state.item === current) {
    current = state.item; image.hidden = current === null; ready = current !== null; progress(state); return;
  }
  const item = state.item;
  current = item; ready = false; image.hidden = false; image.style.visibility = "hidden"; image.dataset.item = item;
  request("/image/" + item + ".png").then(response => response.blob()).then(blob => {
    if (item !== current) return;
    if (image.src) URL.revokeObjectURL(image.src);
    image.onload = () => { image.style.visibility = "visible"; ready = true; progress(state); };
    image.src = URL.createObjectURL(blob);
  }).catch(error => failed(new Error("Could not load image " + item + " (" + error.message + "); reload the page.")));
}
async function act(path, body) {
  if (busy) return;
  busy = true;
  try { show(await call(path, body)); document.getElementById("error").textContent = ""; }
  catch (error) { failed(new Error("Not saved: " + error.message)); }
  finally { busy = false; }
}
function label(value) { if (current !== null && ready) act("/api/label", {item: current, label: value}); }
function undo() { act("/api/undo", {}); }
function start() {
  if (!token && !annotator) { document.getElementById("who").hidden = false; return; }
  if (!token) history.replaceState(null, "", "?annotator=" + encodeURIComponent(annotator));
  document.getElementById("who").hidden = true;
  document.getElementById("work").hidden = false;
  act("/api/next");
}
document.getElementById("who").addEventListener("submit", event => {
  event.preventDefault();
  annotator = document.getElementById("annotator").value.trim();
  start();
});
for (const value of labels) {
  const button = document.createElement("button");
  button.textContent = value === "n" ? "not a digit" : value === "?" ? "unsure" : value;
  button.addEventListener("click", event => { event.currentTarget.blur(); label(value); });
  document.getElementById("buttons").appendChild(button);
}
const back = document.createElement("button");
back.textContent = "undo";
back.addEventListener("click", event => { event.currentTarget.blur(); undo(); });
document.getElementById("buttons").appendChild(back);
document.addEventListener("keydown", event => {
  if (document.getElementById("work").hidden || event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  if (labels.includes(event.key)) { event.preventDefault(); label(event.key); }
  else if (event.key === "Backspace") { event.preventDefault(); undo(); }
});
start();
</script></body></html>
"""


class LabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    item: int
    label: str
    #: Only on a loopback server nobody was invited to; elsewhere the token names the annotator.
    annotator: str | None = None


class UndoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    annotator: str | None = None


def create_app(store: LabelStore, *, loopback: bool) -> FastAPI:
    """The app over ``store``; ``loopback``: it listens on a loopback address only (see the module's docstring)."""
    app = FastAPI(title="invarbench label", docs_url=None, redoc_url=None, openapi_url=None)
    page = PAGE.replace("LABELS_JSON", "[" + ", ".join(f'"{label}"' for label in LABELS) + "]")

    def invited(credentials: HTTPAuthorizationCredentials | None) -> str | None:
        """The annotator of a valid token; None where tokens are not needed (under ``store.lock``)."""
        # Checked per request: an invitation given while the server runs ends the typed names at once.
        if loopback and not store.invitations():
            return None
        if credentials is None:
            raise HTTPException(
                401,
                "no invitation token (Authorization: Bearer TOKEN); open the invitation link `invarbench label invite`"
                " printed for you (it ends in #token=...)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        name = store.annotator_for(credentials.credentials)
        if name is None:
            raise HTTPException(
                403,
                "this invitation token is unknown or was revoked; ask whoever runs the study for a new link"
                " (`invarbench label invite NAME`)",
            )
        return name

    def annotator_of(credentials: HTTPAuthorizationCredentials | None, annotator: str | None) -> str:
        name = invited(credentials)
        if name is not None:
            if annotator is not None:
                raise HTTPException(
                    400,
                    "this server takes the annotator from the invitation token, never from the request; leave out"
                    f" annotator {annotator!r}",
                )
            return name
        if annotator is None:
            raise HTTPException(
                400,
                "no annotator named; pass annotator=NAME (a loopback server nobody was invited to takes the name typed"
                " on the page)",
            )
        try:
            check_annotator_name(annotator)
        except ConfigError as error:
            raise HTTPException(400, str(error)) from error
        return annotator

    def state(annotator: str) -> dict:
        # Only the item's id: never its original image, test index, label or whether it is a control item.
        return {
            "annotator": annotator,
            "item": store.next_item(annotator),
            "done": store.done(annotator),
            "total": store.total(),
        }

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        # Refused before the body is read. h11 reads exactly Content-Length bytes, so the header bounds the body.
        length = request.headers.get("content-length")
        if request.method == "POST" and length is None:
            return JSONResponse(
                {
                    "detail": (
                        f"POST {request.url.path} needs a Content-Length header (a body of at most {MAX_BODY_BYTES}"
                        " bytes, no chunked encoding)"
                    )
                },
                status_code=411,
            )
        if length is not None and int(length) > MAX_BODY_BYTES:
            return JSONResponse(
                {
                    "detail": (
                        f"request body of {length} bytes is larger than the {MAX_BODY_BYTES} this server takes; send"
                        f" e.g. {EXAMPLE_BODIES['/api/label']}"
                    )
                },
                status_code=413,
            )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            (
                "body: not valid JSON"
                if problem["type"] == "json_invalid"
                else f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
            )
            for problem in error.errors()
        )
        example = f"; send JSON like {EXAMPLE_BODIES[request.url.path]}" if request.url.path in EXAMPLE_BODIES else ""
        return JSONResponse(
            {"detail": f"bad request to {request.method} {request.url.path} ({problems}){example}"}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail
        if detail == HTTPStatus(error.status_code).phrase:  # Starlette's own: no such path, or not with this method
            detail = f"{request.method} {request.url.path}: {detail.lower()}; this server answers {ROUTES}"
        return JSONResponse({"detail": detail}, status_code=error.status_code, headers=error.headers)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/next")
    def next_item(credentials: Credentials, annotator: str | None = None) -> dict:
        with store.lock:
            return state(annotator_of(credentials, annotator))

    @app.get("/image/{item_id}.png")
    def image(item_id: int, credentials: Credentials) -> Response:
        with store.lock:
            invited(credentials)
            try:
                pixels = store.image(item_id)
            except InvarbenchError as error:
                raise HTTPException(404, str(error)) from error
        return Response(png_bytes(pixels), media_type="image/png")

    @app.post("/api/label")
    def label(request: LabelRequest, credentials: Credentials) -> dict:
        with store.lock:
            annotator = annotator_of(credentials, request.annotator)
            if not store.has_item(request.item):
                raise HTTPException(404, f"no item {request.item} in this study; label the item /api/next names")
            shown = store.next_item(annotator)
            if request.item != shown:
                where = "you have labelled every item" if shown is None else f"the item shown to you is {shown}"
                raise HTTPException(
                    409, f"item {request.item} is not the item shown to {annotator} ({where}); reload the page"
                )
            try:
                store.label(annotator, request.item, request.label)
            except InvarbenchError as error:
                raise HTTPException(400, str(error)) from error
            return state(annotator)

    @app.post("/api/undo")
    def undo(request: UndoRequest, credentials: Credentials) -> dict:
        with store.lock:
            annotator = annotator_of(credentials, request.annotator)
            store.undo(annotator)
            return state(annotator)

    return app


def listen(store: LabelStore, host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` for the labelling app (port 0: any free port). An address other
    than loopback needs invitations: without them anyone who reaches the port could label as anyone."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ConfigError(
            f"--host {host} is not an address of this machine ({error.strerror}); pass 127.0.0.1, or 0.0.0.0 to listen"
            " on every interface"
        ) from error
    if not ipaddress.ip_address(address[0]).is_loopback and not any(store.invitations().values()):
        raise ConfigError(
            f"--host {host} lets anyone on the network reach the labelling page, and {store.path} has no active"
            f" invitation; invite each annotator first (`invarbench label invite NAME --db {store.path} --url"
            f" http://THIS-MACHINE:{port}/`), or serve on 127.0.0.1"
        )
    # A TCP socket by protocol number, as uvicorn's own: asyncio sets TCP_NODELAY only on those, and
    # without it every answer waits about 40 ms for the client's delayed acknowledgement.
    listening = socket.socket(family, kind, protocol)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(address)
        listening.listen(socket.SOMAXCONN)
    except OSError as error:
        listening.close()
        raise ConfigError(
            f"cannot listen on {host} port {port} ({error.strerror}); pass another --port, or stop the program that"
            " uses it"
        ) from error
    return listening


def serve(store: LabelStore, listening: socket.socket) -> None:
    """Serve the app on the socket of :func:`listen` until interrupted."""
    import uvicorn

    app = create_app(store, loopback=ipaddress.ip_address(listening.getsockname()[0]).is_loopback)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listening])
