"""SegScope's desktop app and ``segscope`` command line (installed as ``segscope.app``)."""
