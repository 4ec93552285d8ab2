"""A small application deployed the usual ways, for tests that start real processes.

Each role is a module run with ``python -m``, importing only what such a process
imports in production: ``reader`` the models and the cached readers, ``writer``
the models and the ``@invalidates`` writers (never the readers), ``script`` the
models only (a migration or cron script). ``APP_MODELS`` names the module that maps
the model, so two processes can run two versions of it side by side. Commands
arrive as JSON lines on standard input and answers leave as JSON lines.
"""
