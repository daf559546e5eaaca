"""The HTTP service: `app.create_app` / `app.run`, the decision log, auth, metrics.

Nothing is imported here, so that importing one part (say, `decisionlog` for
training) does not pull in FastAPI and uvicorn.
"""
