"""One token manager per credential: cache, single flight, bounded waiting, failure state, stores."""
