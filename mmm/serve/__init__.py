"""`python -m mmm.serve ckpt=<folder> port=8765`: an HTTP API and a browser studio for one model.

`mmm.serve.app.create_app(mmm, settings)` builds the FastAPI app (needs the ``serve`` extra:
``pip install -e ".[serve]"``); `mmm.serve.__main__` loads the checkpoint and runs uvicorn.
"""
