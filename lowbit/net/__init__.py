"""Link shaping for benchmarks (netns + tc tbf: testbed.py, its ip/tc commands in iproute.py, both
imported from and run as netns.py) and the alpha-beta cost model (costmodel.py)."""
