"""Privacy of client updates: DP clipping and noise, ε accounting, secure aggregation.

``accounting`` (ε with dp-accounting), ``clipping`` (pure maths of DP-FedAvg),
``secagg`` (the SecAgg+ protocol on Flower's primitives), ``mod`` (the client's side, a
Flower mod) and ``strategy`` (the server's side, a wrapper around any strategy). Nothing
is imported here, so the ClientApp's mod does not pull in the server's accountant.
"""
