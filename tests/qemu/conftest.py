"""The QEMU version matrix for every test here: ``qemu`` (``tests/test_qemu.py``).

A test that takes the ``qemu`` fixture runs once per QEMU of the matrix
(``qemu10.0``, ``qemu11.1``; ``$FAKEVFIO_QEMU``: that build only), skipping a
version that is not set up and failing under ``CI=true``.
"""

from __future__ import annotations

from tests.test_qemu import _need_qemu, qemu

__all__ = ["_need_qemu", "qemu"]
