"""Client side: the Flower ClientApp (``fedtune.clients.app``).

Kept light: nothing is imported here, so a torch-free device client can share the
package.
"""
