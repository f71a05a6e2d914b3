"""The engine's internals, one module per seam (see :class:`p2pkv.Engine` for the public API).

=============  ===============================================================
``state``      peers, sessions and work items (plain state, no I/O)
``base``       the state every part shares, declared once
``loop``       the progress loop: the I/O thread, commands, timers, shutdown
``channel``    control channel and sessions: handshake, auth, liveness, dispatch
``push``       per-tensor push (credit, headers, acks) and its receiving side
``pull``       publish / pull
``requests``   whole-request transfers (offer, grant, post, land, done)
``comms``      NCCL communicators per peer and direction
=============  ===============================================================

:class:`p2pkv.Engine` combines the parts; each part is a mixin over the shared
state in :class:`~p2pkv._engine.base._EngineBase`.
"""
