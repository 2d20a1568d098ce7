"""align methods: one file per method, each registering itself in fskd.methods.METHODS."""
