"""The labelling web app: one candidate at a time, keyboard first, every label stored at once.

A FastAPI application over a :class:`~invarbench.labelling.LabelStore`, served by uvicorn. The page
never shows the original test image or its label (they would bias the reading). Keys: 0-9 label,
``n`` not a digit, ``?`` unsure, Backspace undo. Each annotator resumes at their first unlabelled item.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, Response
from invarbench.errors import InvarbenchError
from invarbench.labelling import LABELS, LabelStore, png_bytes
from pydantic import BaseModel

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>invarbench label</title>
<style>
body { font-family: sans-serif; max-width: 46rem; margin: 2rem auto; color: #222; }
#image { width: 280px; height: 280px; image-rendering: pixelated; border: 1px solid #888; display: block; margin: 1rem 0; background: #000; }
#bar { width: 100%; height: 1rem; }
button { font-size: 1.1rem; min-width: 2.4rem; margin: 0.1rem; }
#who { margin-bottom: 1rem; } .hint { color: #666; font-size: 0.9rem; } #error { color: #b00; }
</style></head><body>
<h1>What digit is this?</h1>
<form id="who"><label>Annotator <input id="annotator" name="annotator" autocomplete="off"></label> <button type="submit">start</button></form>
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
let annotator = new URLSearchParams(location.search).get("annotator") || "";
// current: the item on screen; ready: its image has loaded (a key never labels an image not yet seen);
// busy: a request is in flight (a second key waits for the next image instead of labelling this one twice).
let current = null, ready = false, busy = false;
async function call(path, body) {
  const response = await fetch(path, body ? {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)} : {});
  if (!response.ok) throw new Error(await response.text());
  return response.json();
}
function progress(state) {
  const bar = document.getElementById("bar");
  bar.max = Math.max(1, state.total); bar.value = state.done;
  document.getElementById("progress").textContent = state.done + " / " + state.total + " labelled by " + annotator;
}
function show(state) {
  const image = document.getElementById("image");
  document.getElementById("done").hidden = state.item !== null;
  if (state.item === null || state.item === current) {
    current = state.item; image.hidden = current === null; ready = current !== null; progress(state); return;
  }
  current = state.item; ready = false; image.hidden = false; image.style.visibility = "hidden";
  image.onload = () => { image.style.visibility = "visible"; ready = true; progress(state); };
  image.onerror = () => { document.getElementById("error").textContent = "Could not load image " + state.item + "; reload the page."; };
  image.src = "/image/" + current + ".png";
}
async function act(path, body) {
  if (busy) return;
  busy = true;
  try { show(await call(path, body)); document.getElementById("error").textContent = ""; }
  catch (error) { document.getElementById("error").textContent = "Not saved (is the server running?): " + error.message; }
  finally { busy = false; }
}
function label(value) { if (current !== null && ready) act("/api/label", {annotator, item: current, label: value}); }
function undo() { act("/api/undo", {annotator}); }
function start() {
  if (!annotator) return;
  history.replaceState(null, "", "?annotator=" + encodeURIComponent(annotator));
  document.getElementById("who").hidden = true;
  document.getElementById("work").hidden = false;
  act("/api/next?annotator=" + encodeURIComponent(annotator));
}
document.getElementById("who").addEventListener("submit", event => { event.preventDefault(); annotator = document.getElementById("annotator").value.trim(); start(); });
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
    annotator: str
    item: int
    label: str


class UndoRequest(BaseModel):
    annotator: str


def create_app(store: LabelStore) -> FastAPI:
    app = FastAPI(title="invarbench label", docs_url=None, redoc_url=None)
    page = PAGE.replace("LABELS_JSON", "[" + ", ".join(f'"{label}"' for label in LABELS) + "]")

    def state(annotator: str) -> dict:
        # Only the item's id: never its original image, test index or label (they would bias the reading).
        return {"item": store.next_item(annotator), "done": store.done(annotator), "total": store.total()}

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/next")
    def next_item(annotator: str) -> dict:
        with store.lock:
            return state(annotator)

    @app.get("/image/{item_id}.png")
    def image(item_id: int) -> Response:
        try:
            with store.lock:
                pixels = store.image(item_id)
            return Response(png_bytes(pixels), media_type="image/png")
        except InvarbenchError as error:
            raise HTTPException(404, str(error)) from error

    @app.post("/api/label")
    def label(request: LabelRequest) -> dict:
        with store.lock:
            try:
                store.label(request.annotator, request.item, request.label)
            except InvarbenchError as error:
                raise HTTPException(400, str(error)) from error
            return state(request.annotator)

    @app.post("/api/undo")
    def undo(request: UndoRequest) -> dict:
        with store.lock:
            store.undo(request.annotator)
            return state(request.annotator)

    return app


def serve(store: LabelStore, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(store), host=host, port=port, log_level="warning")
