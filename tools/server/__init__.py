"""python -m tools.server: an OpenAI-compatible HTTP server over the continuous-batching engine
(models/generation/engine.py). app.py is the HTTP side, protocol.py the API's fields and objects."""
