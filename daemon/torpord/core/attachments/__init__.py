"""Engines attached to models: who is attached to what, and the sleep
protocol with them (see torpord.core.engines and torpord.core.attachments.registry).

The protocol speaks domain messages (torpord.core.attachments.messages); the
server's Attach servicer turns them into torpor.v1 messages and back, and the
server's fd socket hands the slabs' file descriptors to the engines.
"""
