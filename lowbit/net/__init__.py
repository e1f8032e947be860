"""Link shaping for benchmarks (netns + tc tbf, see netns.py) and the alpha-beta cost model (costmodel.py)."""
