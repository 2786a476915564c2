"""`python -m mmm.serve ckpt=<folder> port=8765`: an HTTP API and a browser studio for one model.

`mmm.serve.app.create_app(model, settings)` builds the FastAPI app (needs the ``serve`` extra:
``pip install -e ".[serve]"``); `mmm.serve.__main__` starts the worker processes, which load the
checkpoint, and runs uvicorn. The modules: `settings` (no FastAPI), `app` (the app and its
middlewares), `routes` (the endpoints), `server` (their shared state), `forms` (the request
fields, their schema and checks), `schemas` (the answers' shapes), `errors`, `guard` (Host,
Origin, body size), `jobs` (the queue), `workers` (the worker processes, server side), `work`
(what runs inside them), `music` (uploads and analysis), `load` (the load test).
"""
