"""Tools around the product: benchmarks (`m2das bench`) and the end-to-end demo (`m2das demo`)."""
