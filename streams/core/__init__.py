"""Foundation shared by every layer: settings, config, serde, metrics, topics, dead letters, processes."""
