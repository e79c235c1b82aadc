"""Data sources (the synthetic scenes benchmark, NYUv2) and the tf.data pipeline."""
