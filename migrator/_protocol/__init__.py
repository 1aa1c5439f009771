"""Pure protocol cores of the migrator: no trio, no sockets, no clock.

General layout: ``main`` is the main channel and return path (a
``SourceProtocol`` and a ``DestinationProtocol`` checked against one
``TRANSITIONS`` table), with its events in ``events``; ``multifd`` is the
destination's multifd intake (channel handshakes, packet checks, every device's
reassembler and the one shared queue budget) and the source's packet planning;
``convergence`` is the source's pre-copy switchover policy. The trio engines in
``migrator.source`` and
``migrator.destination`` move bytes and time into these and act on what they say.
"""
