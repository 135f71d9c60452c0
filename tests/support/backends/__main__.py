"""``python -m tests.support.backends --name N [--port P] [--log FILE]``: a ``FaultyServer``
until killed (what ``BackendProcess`` runs)."""

from tests.support.backends.process import main

main()
