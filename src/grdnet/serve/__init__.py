"""`grdnet serve`: a REST API and an operator's web page over a trained model.

>>> from grdnet.serve import create_app, ServeSettings
>>> app = create_app(grdnet.load("runs/tile"), ServeSettings(api_key="..."))  # an ASGI app
"""
from .app import ServeSettings, create_app, serve

__all__ = ["create_app", "serve", "ServeSettings"]
