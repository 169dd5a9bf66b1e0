"""Example gateway plugins (load with ``--plugin examples.plugins.<module>:setup``)."""
