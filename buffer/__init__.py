"""The Redis Streams buffer pool: the contract between gateway and workers.

``keys`` names every key, ``message`` is the stream entry format, ``admission`` puts orders in,
``consumer`` takes them out (a cursor per lane, claim, settle), ``deadletters`` holds the poison,
``position`` and ``overview`` measure the queue. The Lua scripts live in ``lua/``, one module
(``scripts``) loads them.
"""
