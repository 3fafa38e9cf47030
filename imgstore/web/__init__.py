"""``imgstore serve``: the JSON API, the web pages, and the service they share.

Layers, each importing only those below it: :mod:`~imgstore.web.app` (the application) ->
:mod:`~imgstore.web.api` and :mod:`~imgstore.web.pages` (the routers) ->
:mod:`~imgstore.web.http` (statuses, errors, guard, uploads, parameters) ->
:mod:`~imgstore.web.render` (templates) -> :mod:`~imgstore.web.service` (the server's state,
over ``ImageStore``'s public API) and :mod:`~imgstore.web.schemas` (the HTTP contract). Nothing
here imports the models, SQLAlchemy or the store's context.
"""
