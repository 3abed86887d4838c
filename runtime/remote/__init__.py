"""Remote targets: run the device-side stages on a board over the system ssh (docs/remote.md).

``targets`` stores them, ``ssh`` talks to them through OpenSSH and the board-side ``agent``
(standard library only), ``stages`` runs ``--target`` stage commands, ``run`` measures a
``bckd run`` on a board, ``wheel`` packs this host's bckd for a board without internet.
"""
