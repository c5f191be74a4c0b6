"""The semantic query's pure parts: the top-k histogram, its noise and the selection."""
