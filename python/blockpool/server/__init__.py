"""``blockpool serve``: OpenAI's and Anthropic's HTTP APIs over one continuous batch, with persistent agents.

``command`` is the CLI, ``app`` the ASGI app and its routes, ``runner`` the
engine thread, ``distributed`` the rank-0 broadcast under ``mlx.launch``;
see ``docs/server.md``.
"""
