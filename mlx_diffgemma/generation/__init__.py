"""Generation: settings, the drafter loop and its events, the denoisers, fast mode, speculative drafting, the API."""
