"""Tooling, not runtime: what the test suite (and benchmarks) use to make real
traffic. :mod:`.topology` builds two scratch network namespaces and drives
the ``flowgen`` generator (source in ``tools/flowgen.c``, built by
``make -C tools``). Nothing that an agent embeds imports this package.
"""
