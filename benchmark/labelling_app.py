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
body { font-family: sans-serif; max-width: 40rem; margin: 2rem auto; color: #222; }
#image { width: 280px; height: 280px; image-rendering: pixelated; border: 1px solid #888; display: block; margin: 1rem 0; background: #000; }
#bar { width: 100%; height: 1rem; background: #ddd; } #fill { height: 100%; background: #3a7; width: 0; }
button { font-size: 1.1rem; min-width: 2.4rem; margin: 0.1rem; }
#who { margin-bottom: 1rem; } .hint { color: #666; font-size: 0.9rem; }
</style></head><body>
<h1>What digit is this?</h1>
<form id="who"><label>Annotator <input id="annotator" name="annotator" autocomplete="off"></label> <button type="submit">start</button></form>
<div id="work" hidden>
<div id="bar"><div id="fill"></div></div><p id="progress"></p>
<img id="image" alt="image to label">
<p id="done" hidden>All items labelled. Thank you.</p>
<div id="buttons"></div>
<p class="hint">Keys: 0-9 the digit you read, n not a digit, ? unsure, Backspace undo.</p>
</div>
<script>
const labels = LABELS_JSON;
let annotator = new URLSearchParams(location.search).get("annotator") || "";
let current = null;
async function call(path, body) {
  const response = await fetch(path, body ? {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)} : {});
  if (!response.ok) throw new Error(await response.text());
  return response.json();
}
function show(state) {
  current = state.item;
  document.getElementById("fill").style.width = (100 * state.done / Math.max(1, state.total)) + "%";
  document.getElementById("progress").textContent = state.done + " / " + state.total + " labelled by " + annotator;
  document.getElementById("image").hidden = current === null;
  document.getElementById("done").hidden = current !== null;
  if (current !== null) document.getElementById("image").src = "/image/" + current + ".png";
}
async function refresh() { show(await call("/api/next?annotator=" + encodeURIComponent(annotator))); }
async function label(value) { if (current !== null) show(await call("/api/label", {annotator, item: current, label: value})); }
async function undo() { show(await call("/api/undo", {annotator})); }
function start() {
  if (!annotator) return;
  history.replaceState(null, "", "?annotator=" + encodeURIComponent(annotator));
  document.getElementById("who").hidden = true;
  document.getElementById("work").hidden = false;
  refresh();
}
document.getElementById("who").addEventListener("submit", event => { event.preventDefault(); annotator = document.getElementById("annotator").value.trim(); start(); });
for (const value of labels) {
  const button = document.createElement("button");
  button.textContent = value === "n" ? "not a digit" : value === "?" ? "unsure" : value;
  button.addEventListener("click", () => label(value));
  document.getElementById("buttons").appendChild(button);
}
document.addEventListener("keydown", event => {
  if (document.getElementById("work").hidden) return;
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
        return {"item": store.next_item(annotator), "done": store.done(annotator), "total": store.total()}

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/next")
    def next_item(annotator: str) -> dict:
        return state(annotator)

    @app.get("/image/{item_id}.png")
    def image(item_id: int) -> Response:
        try:
            return Response(png_bytes(store.image(item_id)), media_type="image/png")
        except InvarbenchError as error:
            raise HTTPException(404, str(error)) from error

    @app.post("/api/label")
    def label(request: LabelRequest) -> dict:
        try:
            store.label(request.annotator, request.item, request.label)
        except InvarbenchError as error:
            raise HTTPException(400, str(error)) from error
        return state(request.annotator)

    @app.post("/api/undo")
    def undo(request: UndoRequest) -> dict:
        store.undo(request.annotator)
        return state(request.annotator)

    return app


def serve(store: LabelStore, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(store), host=host, port=port, log_level="warning")
