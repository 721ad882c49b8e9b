"""Example adapters: dopsd_ref itself in the three conventions, and two trainer-style loops.

Run any of them with the kit, e.g.::

    python -m dopsd_ref.conformance --impl dopsd_ref.conformance.examples.zimage:rollout --convention zimage
"""
