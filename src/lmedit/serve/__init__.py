"""``lmedit serve``: a playground page and an OpenAI-compatible API over a model you can correct.

- :mod:`.store`   the SQLite edit log and the saved edits (one transaction per applied edit);
- :mod:`.engine`  owns the model handle: answers under a read lock, edits/undo/import under a write lock;
- :mod:`.teach`   one fact taught (case, before/after, scores) and the export/import format;
- :mod:`.app`     the FastAPI routes; :mod:`.security` the guard in front of them; ``static/`` the page.

Needs the ``serve`` extra (FastAPI, uvicorn): ``pip install 'lmedit[serve]'``.
"""
